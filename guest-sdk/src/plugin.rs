//! The [`Plugin`] trait and the glue behind [`export_plugin!`](crate::export_plugin).

use crate::bindings::sandpipe::connector::types::Error as WitError;
use crate::{Description, Error, Message, Outcome};

/// A Sandpipe plugin: implement this trait on a type (usually a unit struct)
/// and export it with [`export_plugin!`](crate::export_plugin).
///
/// A plugin holds no state between calls: every message may run in a fresh
/// instance. Keep state in [`meta::state_set`](crate::meta::state_set) or
/// [`sql`](crate::sql).
///
/// ```no_run
/// use sandpipe_sdk::prelude::*;
///
/// struct Hello;
///
/// impl Plugin for Hello {
///     fn describe() -> Description {
///         Description {
///             name: "hello".into(),
///             version: env!("CARGO_PKG_VERSION").into(),
///             mime_types: vec!["text/*".into()],
///             capabilities: vec![Capability::Log],
///         }
///     }
///
///     fn execute(msg: Message) -> Result<Outcome, Error> {
///         log::info(&format!("hello, {}", msg.id))?;
///         Ok(Outcome::Done)
///     }
/// }
///
/// sandpipe_sdk::export_plugin!(Hello);
/// ```
pub trait Plugin {
    /// Describe the plugin: name, version, MIME types, wanted capabilities.
    /// Called once when the engine loads the component.
    fn describe() -> Description;

    /// Process one message. `Ok(outcome)` decides what happens to it;
    /// `Err(error)` fails it (the engine records the error and applies its
    /// retry policy).
    fn execute(msg: Message) -> Result<Outcome, Error>;
}

/// Calls `P::execute` and converts its error for the WIT boundary. Used by
/// [`export_plugin!`](crate::export_plugin).
#[doc(hidden)]
pub fn execute<P: Plugin>(msg: Message) -> Result<Outcome, WitError> {
    P::execute(msg).map_err(WitError::from)
}

/// Export a [`Plugin`] implementation as the component's `describe` and
/// `execute` functions. Call it exactly once per plugin crate, at the top
/// level, with the plugin's type name.
///
/// ```no_run
/// use sandpipe_sdk::prelude::*;
///
/// struct Noop;
///
/// impl Plugin for Noop {
///     fn describe() -> Description {
///         Description {
///             name: "noop".into(),
///             version: "0.1.0".into(),
///             mime_types: vec!["*/*".into()],
///             capabilities: vec![],
///         }
///     }
///
///     fn execute(_msg: Message) -> Result<Outcome, Error> {
///         Ok(Outcome::Done)
///     }
/// }
///
/// sandpipe_sdk::export_plugin!(Noop);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            #[doc(hidden)]
            #[allow(dead_code)]
            struct __SandpipeExport;

            impl $crate::bindings::Guest for __SandpipeExport {
                fn describe() -> $crate::bindings::Description {
                    <$plugin as $crate::Plugin>::describe()
                }

                fn execute(
                    msg: $crate::bindings::Message,
                ) -> ::core::result::Result<$crate::bindings::Outcome, $crate::bindings::Error>
                {
                    $crate::__private::execute::<$plugin>(msg)
                }
            }

            // Only a component exports the world: a host build (the
            // plugin's tests, a native benchmark linking several plugins)
            // must not define the same `cabi_*` symbols twice.
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::__export_plugin_world!(__SandpipeExport with_types_in $crate::bindings);
        };
    };
}
