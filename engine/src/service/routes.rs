//! A service's declared routes: checked when the component describes
//! itself (a guest's `describe` is untrusted input), and described as an
//! OpenAPI 3 document.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::sandbox::bindings::{Route, ServiceDescription};

/// The methods a route may declare.
pub const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Where the listener serves the OpenAPI document; no route may take it.
pub const OPENAPI_PATH: &str = "/openapi.json";

/// The most routes one service may declare.
pub const MAX_ROUTES: usize = 256;

/// The `{name}` segments of `path`, in order.
pub fn params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

/// `path` with every `{name}` as `{}`: two paths of one shape would be
/// the same route to the router.
fn shape(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "{}" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// Why `routes` cannot be served, if they cannot: a method outside
/// [`METHODS`], a path that is not `/`-separated literal segments
/// (letters, digits, `-._~`) and `{name}` segments, a name used twice in a
/// path, two routes of one method and shape, or two paths of one shape
/// with other names.
pub fn check(routes: &[Route]) -> Result<(), String> {
    if routes.len() > MAX_ROUTES {
        return Err(format!("{} routes, more than {MAX_ROUTES}", routes.len()));
    }
    let mut shapes: BTreeMap<String, &str> = BTreeMap::new();
    let mut seen: BTreeMap<(String, String), ()> = BTreeMap::new();
    for route in routes {
        let what = format!("{} {}", route.method, route.path);
        if !METHODS.contains(&route.method.as_str()) {
            return Err(format!(
                "`{what}`: the method must be one of {}",
                METHODS.join(", ")
            ));
        }
        let path = route.path.as_str();
        if !path.starts_with('/') || path.len() > 1024 {
            return Err(format!(
                "`{what}`: a path starts with `/` (and is at most 1024 bytes)"
            ));
        }
        if path == OPENAPI_PATH {
            return Err(format!(
                "`{what}`: {OPENAPI_PATH} is the engine's (the OpenAPI document)"
            ));
        }
        let mut names = Vec::new();
        for segment in path[1..].split('/') {
            if path == "/" {
                break;
            }
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let ok = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !ok {
                    return Err(format!(
                        "`{what}`: `{segment}` is not a `{{name}}` segment (letters, digits, `_`)"
                    ));
                }
                if names.contains(&name) {
                    return Err(format!("`{what}`: `{{{name}}}` appears twice"));
                }
                names.push(name);
            } else if segment.is_empty()
                || !segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
            {
                return Err(format!(
                    "`{what}`: `{segment}` is not a path segment (letters, digits, `-._~`, or `{{name}}`)"
                ));
            }
        }
        let shape = shape(path);
        match shapes.get(&shape) {
            Some(other) if *other != path => {
                return Err(format!(
                    "`{what}` and `{other}` are the same path with other names"
                ));
            }
            _ => {
                shapes.insert(shape.clone(), path);
            }
        }
        if seen.insert((route.method.clone(), shape), ()).is_some() {
            return Err(format!("`{what}` is declared twice"));
        }
    }
    Ok(())
}

/// The OpenAPI 3 document of a service's routes.
pub fn openapi(service: &str, description: &ServiceDescription) -> Value {
    let mut paths: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
    for route in &description.routes {
        let parameters: Vec<Value> = params(&route.path)
            .into_iter()
            .map(|name| {
                json!({
                    "name": name,
                    "in": "path",
                    "required": true,
                    "schema": {"type": "string"},
                })
            })
            .collect();
        let mut operation = json!({
            "summary": route.summary,
            "operationId": format!("{} {}", route.method, route.path),
            "parameters": parameters,
            "responses": {
                "default": {"description": "the service's response"},
                "404": {"description": "no such route (answered by the engine)"},
                "413": {"description": "the body is larger than services.NAME.http.max_body"},
            },
        });
        if matches!(route.method.as_str(), "POST" | "PUT" | "PATCH")
            && let Some(op) = operation.as_object_mut()
        {
            op.insert(
                "requestBody".into(),
                json!({
                    "content": {
                        "application/json": {"schema": {}},
                        "multipart/form-data": {"schema": {"type": "object"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    }
                }),
            );
        }
        paths
            .entry(route.path.as_str())
            .or_default()
            .insert(route.method.to_ascii_lowercase(), operation);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": format!("{service} ({})", description.name),
            "version": description.version,
        },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: &str) -> Route {
        Route {
            method: method.into(),
            path: path.into(),
            summary: String::new(),
        }
    }

    #[test]
    fn good_routes_pass_and_bad_ones_are_named() {
        let good = [
            route("POST", "/metadata/project"),
            route("PATCH", "/metadata/project/{id}"),
            route("GET", "/metadata/project/{id}"),
            route("POST", "/metadata/project/{id}/files"),
            route("GET", "/"),
        ];
        assert_eq!(check(&good), Ok(()));
        let bad = |routes: &[Route], needle: &str| {
            let e = check(routes).unwrap_err();
            assert!(e.contains(needle), "{e}");
        };
        bad(&[route("TRACE", "/a")], "method must be one of");
        bad(&[route("GET", "a")], "starts with `/`");
        bad(&[route("GET", "/a//b")], "is not a path segment");
        bad(&[route("GET", "/a/{*rest}")], "is not a `{name}` segment");
        bad(&[route("GET", "/a/{x}/{x}")], "appears twice");
        bad(&[route("GET", "/a/b c")], "is not a path segment");
        bad(
            &[route("GET", "/a/{x}"), route("GET", "/a/{y}")],
            "same path with other names",
        );
        bad(
            &[route("GET", "/a/{x}"), route("POST", "/a/{y}")],
            "same path with other names",
        );
        bad(&[route("GET", "/a"), route("GET", "/a")], "declared twice");
        bad(&[route("GET", "/openapi.json")], "the engine's");
    }

    #[test]
    fn the_openapi_document_lists_every_route_with_its_parameters() {
        let description = ServiceDescription {
            name: "zenodo".into(),
            version: "1.0.0".into(),
            routes: vec![
                route("POST", "/metadata/project"),
                route("PATCH", "/metadata/project/{id}"),
            ],
        };
        let doc = openapi("rds", &description);
        assert_eq!(doc["openapi"], "3.0.3");
        assert_eq!(
            doc["paths"]["/metadata/project/{id}"]["patch"]["parameters"][0]["name"],
            "id"
        );
        assert!(doc["paths"]["/metadata/project"]["post"]["requestBody"].is_object());
    }
}
