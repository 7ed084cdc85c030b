//! Service connectors: the `service` world (docs/services.md). Implement
//! [`Service`] on a type and export it with
//! [`export_service!`](crate::export_service); the engine calls it on a
//! warm instance for every query, event and request that arrives over the
//! transports it owns (HTTP, a Vantiq-protocol connection, brokers). The
//! capability modules ([`sql`](crate::sql), [`http`](crate::http),
//! [`emit`](crate::emit), ...) work as they do in a plugin, under the
//! service's grant; a call's effects are applied when it returns `Ok`.
//!
//! ```no_run
//! use sandpipe_sdk::prelude::*;
//! use sandpipe_sdk::service::{Query, Reply, Service, ServiceDescription};
//!
//! struct Count;
//!
//! impl Service for Count {
//!     fn describe() -> ServiceDescription {
//!         ServiceDescription { name: "count".into(), version: "1.0.0".into(), routes: vec![] }
//!     }
//!
//!     fn on_query(query: Query, reply: Reply) -> Result<(), Error> {
//!         let n: u64 = query.json()?["n"].as_u64().unwrap_or(0);
//!         for page in 0..n / 100 {
//!             let rows: Vec<_> = (page * 100..page * 100 + 100).map(|i| json!({ "i": i })).collect();
//!             reply.partial(&json!(rows))?;
//!         }
//!         reply.empty()
//!     }
//! }
//!
//! sandpipe_sdk::export_service!(Count);
//! ```

use serde_json::Value;

use crate::Error;
use crate::bindings::sandpipe::connector::types::Error as WitError;
pub use crate::service_bindings::sandpipe::connector::service_types::{
    Event, Part, Query, Request, Response, Route, ServiceDescription,
};

/// A service connector. Only `describe` and `on_query` are required.
pub trait Service {
    /// Describe the service and its HTTP routes. Called once when the
    /// engine loads it.
    fn describe() -> ServiceDescription;

    /// Source `source` is set up (or set up again) with `config` (JSON
    /// text). Called on every new instance before anything else, and after
    /// [`Service::on_close`] when the configuration changes. Default: ok.
    fn on_connect(_source: String, _config: String) -> Result<(), Error> {
        Ok(())
    }

    /// Act on an event. Default: ignore it.
    fn on_publish(_event: Event) -> Result<(), Error> {
        Ok(())
    }

    /// Answer a query through `reply`: any number of
    /// [`Reply::partial`]s, then one of [`Reply::complete`],
    /// [`Reply::empty`] or [`Reply::error`].
    fn on_query(query: Query, reply: Reply) -> Result<(), Error>;

    /// Answer a request to a declared route. Default: 404.
    fn on_request(request: Request) -> Result<Response, Error> {
        Ok(Response::json(
            404,
            &serde_json::json!({ "error": format!("{} {} is not served", request.method, request.path) }),
        ))
    }

    /// Source `source`'s connection closes. Default: ok.
    fn on_close(_source: String) -> Result<(), Error> {
        Ok(())
    }
}

impl Event {
    /// The event's body, parsed.
    pub fn json(&self) -> Result<Value, Error> {
        serde_json::from_str(&self.body)
            .map_err(|e| Error::invalid(format!("the event is not JSON: {e}")))
    }
}

impl Query {
    /// The query's body, parsed.
    pub fn json(&self) -> Result<Value, Error> {
        serde_json::from_str(&self.body)
            .map_err(|e| Error::invalid(format!("the query is not JSON: {e}")))
    }
}

impl Request {
    /// The value of the route's `{name}` segment.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body, parsed as JSON.
    pub fn json(&self) -> Result<Value, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::invalid(format!("the body is not JSON: {e}")))
    }
}

impl Response {
    /// A response with a JSON body.
    pub fn json(status: u16, body: &Value) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    /// A response without a body.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
}

/// What a [`Reply`] sent, on the host target (unit tests).
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// [`Reply::partial`].
    Partial(Value),
    /// [`Reply::complete`].
    Complete(Value),
    /// [`Reply::empty`].
    Empty,
    /// [`Reply::error`].
    Error(String, String, Vec<String>),
}

/// The answer to one query. Partial replies go out as they are made; the
/// final one (`complete`, `empty` or `error`) consumes the reply.
pub struct Reply {
    #[cfg(target_arch = "wasm32")]
    inner: crate::service_bindings::sandpipe::connector::service_types::Reply,
    #[cfg(not(target_arch = "wasm32"))]
    sent: std::rc::Rc<std::cell::RefCell<Vec<Sent>>>,
}

impl Reply {
    /// A reply that records what it is sent, and what it records (host
    /// target: for unit tests of `on_query`).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn recorder() -> (Self, std::rc::Rc<std::cell::RefCell<Vec<Sent>>>) {
        let sent = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        (Self { sent: sent.clone() }, sent)
    }

    /// Part of the answer: a JSON object or an array of objects.
    pub fn partial(&self, body: &Value) -> Result<(), Error> {
        #[cfg(target_arch = "wasm32")]
        return self.inner.partial(&body.to_string()).map_err(Error::from);
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.sent.borrow_mut().push(Sent::Partial(body.clone()));
            Ok(())
        }
    }

    /// The last part of the answer: a JSON object or an array of objects.
    pub fn complete(self, body: &Value) -> Result<(), Error> {
        #[cfg(target_arch = "wasm32")]
        return self.inner.complete(&body.to_string()).map_err(Error::from);
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.sent.borrow_mut().push(Sent::Complete(body.clone()));
            Ok(())
        }
    }

    /// No (more) answer.
    pub fn empty(self) -> Result<(), Error> {
        #[cfg(target_arch = "wasm32")]
        return self.inner.empty().map_err(Error::from);
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.sent.borrow_mut().push(Sent::Empty);
            Ok(())
        }
    }

    /// The query failed: `code` names the failure, `template` says it with
    /// `{0}`-style placeholders for `parameters`.
    pub fn error(self, code: &str, template: &str, parameters: &[&str]) -> Result<(), Error> {
        let parameters: Vec<String> = parameters.iter().map(|p| (*p).to_owned()).collect();
        #[cfg(target_arch = "wasm32")]
        return self
            .inner
            .error(code, template, &parameters)
            .map_err(Error::from);
        #[cfg(not(target_arch = "wasm32"))]
        {
            self.sent
                .borrow_mut()
                .push(Sent::Error(code.into(), template.into(), parameters));
            Ok(())
        }
    }
}

/// Send `body` as an event on `source`'s connection (to whoever follows
/// the service). `unavailable` when no one does.
pub fn notify(source: &str, body: &Value) -> Result<(), Error> {
    #[cfg(target_arch = "wasm32")]
    return crate::service_bindings::sandpipe::connector::notify::send(source, &body.to_string())
        .map_err(Error::from);
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (source, body);
        Err(Error::unavailable(
            "no one follows a service on the host target",
        ))
    }
}

#[doc(hidden)]
pub fn on_connect<S: Service>(source: String, config: String) -> Result<(), WitError> {
    S::on_connect(source, config).map_err(WitError::from)
}

#[doc(hidden)]
pub fn on_publish<S: Service>(event: Event) -> Result<(), WitError> {
    S::on_publish(event).map_err(WitError::from)
}

#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
pub fn on_query<S: Service>(
    query: Query,
    reply: crate::service_bindings::sandpipe::connector::service_types::Reply,
) -> Result<(), WitError> {
    S::on_query(query, Reply { inner: reply }).map_err(WitError::from)
}

#[doc(hidden)]
#[cfg(not(target_arch = "wasm32"))]
pub fn on_query<S: Service>(
    query: Query,
    _reply: crate::service_bindings::sandpipe::connector::service_types::Reply,
) -> Result<(), WitError> {
    let (reply, _) = Reply::recorder();
    S::on_query(query, reply).map_err(WitError::from)
}

#[doc(hidden)]
pub fn on_request<S: Service>(request: Request) -> Result<Response, WitError> {
    S::on_request(request).map_err(WitError::from)
}

/// Export a [`Service`] implementation as the component's `service`-world
/// functions. Call it exactly once per service crate, at the top level.
#[macro_export]
macro_rules! export_service {
    ($service:ty) => {
        const _: () = {
            #[doc(hidden)]
            #[allow(dead_code)]
            struct __SandpipeServiceExport;

            impl $crate::service_bindings::Guest for __SandpipeServiceExport {
                fn describe() -> $crate::service::ServiceDescription {
                    <$service as $crate::service::Service>::describe()
                }

                fn on_connect(
                    source: ::std::string::String,
                    config: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::service_bindings::Error> {
                    $crate::__private::on_connect::<$service>(source, config)
                }

                fn on_publish(
                    event: $crate::service::Event,
                ) -> ::core::result::Result<(), $crate::service_bindings::Error> {
                    $crate::__private::on_publish::<$service>(event)
                }

                fn on_query(
                    query: $crate::service::Query,
                    reply: $crate::service_bindings::Reply,
                ) -> ::core::result::Result<(), $crate::service_bindings::Error> {
                    $crate::__private::on_query::<$service>(query, reply)
                }

                fn on_request(
                    request: $crate::service::Request,
                ) -> ::core::result::Result<$crate::service::Response, $crate::service_bindings::Error> {
                    $crate::__private::on_request::<$service>(request)
                }

                fn on_close(
                    source: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::service_bindings::Error> {
                    <$service as $crate::service::Service>::on_close(source)
                        .map_err($crate::service_bindings::Error::from)
                }
            }

            // Only a component exports the world (see `export_plugin!`).
            #[cfg(target_arch = "wasm32")]
            $crate::service_bindings::__export_service_world!(__SandpipeServiceExport with_types_in $crate::service_bindings);
        };
    };
}
