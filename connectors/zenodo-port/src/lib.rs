//! A Sciebo RDS metadata port in the style of RDS's Zenodo port: the RDS
//! port API as declared HTTP routes, answered with a Zenodo-style
//! deposition API (`{repository}/api/deposit/depositions`).
//!
//! | route | does |
//! |---|---|
//! | `GET /metadata/project` | the user's depositions: `[{projectId, metadata}]` |
//! | `POST /metadata/project` | a new deposition: `{projectId, metadata}` (201) |
//! | `GET /metadata/project/{id}` | one deposition |
//! | `PATCH /metadata/project/{id}` | its metadata from RO-Crate JSON-LD (`metadata`) |
//! | `PUT /metadata/project/{id}` | publish it (204) |
//! | `DELETE /metadata/project/{id}` | delete it (204) |
//! | `POST /metadata/project/{id}/files` | upload the multipart `files` parts, one by one, going on past a failed one: `{success, files: [{filename, success, error}]}` |
//! | `GET /storage/folder` | the files of the deposition `filepath` names (`/ID/`): `{files: ["/ID/NAME", ...]}` |
//! | `GET /storage/file` | the bytes of the file `filepath` names (`/ID/NAME`) |
//! | `POST /storage/file` | upload the multipart `files` into the deposition `filepath` names: `{success, files}` |
//! | `DELETE /storage/file` | delete the file `filepath` names (204) |
//!
//! The `/storage` routes are RDS's fileStorage interface, its paths
//! `/DEPOSITION-ID/FILENAME`.
//!
//! The user is the request's `userId` (RDS's `port-zenodo://USER:...` or
//! `USER`; in the JSON body, a multipart field or the query string); every
//! repository request names them in `x-sandpipe-user`, and the engine
//! attaches their OAuth token (`http.auth`'s `oauth_user`): the component
//! never sees it. Configuration: `repository` (the repository's base URL).

use sandpipe_sdk::prelude::*;
use sandpipe_sdk::serde_json::{Map, Value};
use sandpipe_sdk::service::{Query, Reply, Request, Response, Route, Service, ServiceDescription};

/// The port.
pub struct ZenodoPort;

/// The user of an RDS `userId`: `port-zenodo://alice:secret` → `alice`.
pub fn user_of(user_id: &str) -> &str {
    match user_id.split_once("://") {
        Some((_, rest)) => rest.split(':').next().unwrap_or(rest),
        None => user_id,
    }
}

/// Zenodo deposition metadata from RO-Crate JSON-LD (the root data
/// entity's `name`, `description`, `keywords`, `license`, and its
/// `creator`s resolved in the graph), or from a plain object with those
/// keys.
pub fn deposition_metadata(crate_: &Value) -> Value {
    let graph: Vec<&Value> = crate_["@graph"]
        .as_array()
        .map(|g| g.iter().collect())
        .unwrap_or_default();
    let root = graph
        .iter()
        .copied()
        .find(|e| e["@id"] == "./")
        .unwrap_or(crate_);
    let name_of = |v: &Value| -> Option<String> {
        if let Some(name) = v["name"].as_str() {
            return Some(name.to_owned());
        }
        let id = v["@id"].as_str()?;
        graph
            .iter()
            .find(|e| e["@id"] == id)
            .and_then(|e| e["name"].as_str())
            .map(str::to_owned)
    };
    let creators: Vec<Value> = match &root["creator"] {
        Value::Array(list) => list.iter().filter_map(name_of).collect(),
        Value::Null => Vec::new(),
        one => name_of(one).into_iter().collect(),
    }
    .into_iter()
    .map(|name| json!({ "name": name }))
    .collect();
    let keywords: Vec<Value> = match &root["keywords"] {
        Value::Array(list) => list.clone(),
        Value::String(s) => s.split(',').map(|k| json!(k.trim())).collect(),
        _ => Vec::new(),
    };
    let mut metadata = Map::new();
    metadata.insert("upload_type".into(), json!("dataset"));
    metadata.insert(
        "title".into(),
        json!(root["name"].as_str().unwrap_or("Untitled")),
    );
    metadata.insert(
        "description".into(),
        json!(root["description"].as_str().unwrap_or("")),
    );
    if !creators.is_empty() {
        metadata.insert("creators".into(), Value::Array(creators));
    }
    if !keywords.is_empty() {
        metadata.insert("keywords".into(), Value::Array(keywords));
    }
    if let Some(license) = root["license"]
        .as_str()
        .or_else(|| root["license"]["@id"].as_str())
    {
        metadata.insert("license".into(), json!(license));
    }
    Value::Object(metadata)
}

fn repository() -> Result<String, Error> {
    let url = config::get("repository")?.ok_or_else(|| {
        Error::invalid("config `repository` is required: the repository's base URL")
    })?;
    Ok(format!(
        "{}/api/deposit/depositions",
        url.trim_end_matches('/')
    ))
}

/// A request to the repository for `user`.
fn call(method: &str, url: &str, user: &str) -> sandpipe_sdk::http::Request {
    sandpipe_sdk::http::Request::new(method, url).header("x-sandpipe-user", user)
}

/// The answer of a repository call: its JSON, or an error naming the status.
fn answer(response: sandpipe_sdk::http::Response, what: &str) -> Result<(u16, Value), Error> {
    let status = response.status();
    let text = response.text(4 << 20)?;
    if status >= 400 {
        return Err(Error::unavailable(format!(
            "{what}: the repository answered {status}: {text}"
        )));
    }
    Ok((
        status,
        sandpipe_sdk::serde_json::from_str(&text).unwrap_or(Value::Null),
    ))
}

fn json_response(status: u16, body: &Value) -> Response {
    Response::json(status, body)
}

/// Field `name` of the request: from its JSON body, a multipart field or
/// the query string.
fn field(request: &Request, name: &str) -> Option<String> {
    let from_body = request
        .json()
        .ok()
        .and_then(|b| b[name].as_str().map(str::to_owned));
    let from_parts = || {
        request
            .parts
            .iter()
            .find(|p| p.name == name)
            .map(|p| String::from_utf8_lossy(&p.body).into_owned())
    };
    let from_query = || {
        request
            .query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    from_body.or_else(from_parts).or_else(from_query)
}

/// The request's user (its `userId`).
fn user(request: &Request) -> Result<String, Error> {
    let id = field(request, "userId")
        .ok_or_else(|| Error::invalid("every request names its user: `userId`"))?;
    Ok(user_of(&id).to_owned())
}

/// A fileStorage path `/ID/NAME` (or `/ID/` for a folder): the deposition
/// and the file name (empty for a folder).
pub fn storage_path(path: &str) -> Result<(String, String), Error> {
    let trimmed = path.trim_start_matches('/');
    let (id, name) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || name.contains('/') {
        return Err(Error::invalid(format!(
            "`{path}` is not `/DEPOSITION-ID/` or `/DEPOSITION-ID/FILENAME`"
        )));
    }
    Ok((id.to_owned(), name.to_owned()))
}

/// The deposition's files as the repository lists them.
fn files_of(base: &str, id: &str, user: &str) -> Result<Vec<Value>, Error> {
    let (_, files) = answer(
        call("GET", &format!("{base}/{id}/files"), user).send()?,
        "listing the files",
    )?;
    Ok(files.as_array().cloned().unwrap_or_default())
}

/// Upload the multipart `files` parts of `request` into deposition `id`,
/// one by one, going on past a failed one.
fn upload(request: &Request, base: &str, id: &str, user: &str) -> Result<Response, Error> {
    let url = format!("{base}/{id}/files");
    let mut results = Vec::new();
    for part in request.parts.iter().filter(|p| p.name == "files") {
        let filename = part.filename.clone().unwrap_or_else(|| "file".into());
        let (content_type, body) = multipart(&filename, &part.body);
        let sent = call("POST", &url, user)
            .header("content-type", &content_type)
            .body(body)
            .send()
            .and_then(|r| answer(r, &format!("uploading {filename}")));
        results.push(match sent {
            Ok(_) => json!({ "filename": filename, "success": true }),
            Err(e) => json!({ "filename": filename, "success": false, "error": e.to_string() }),
        });
    }
    let success = results.iter().all(|r| r["success"] == true);
    Ok(json_response(
        200,
        &json!({ "success": success, "files": results }),
    ))
}

/// A request to RDS's fileStorage interface.
fn storage(request: &Request, base: &str, user: &str) -> Result<Response, Error> {
    let path = field(request, "filepath")
        .ok_or_else(|| Error::invalid("a fileStorage request names its `filepath`"))?;
    let (id, name) = storage_path(&path)?;
    match (
        request.method.as_str(),
        request.route.as_str(),
        name.is_empty(),
    ) {
        ("GET", "/storage/folder", _) => {
            let files: Vec<Value> = files_of(base, &id, user)?
                .iter()
                .filter_map(|f| f["filename"].as_str())
                .map(|f| json!(format!("/{id}/{f}")))
                .collect();
            Ok(json_response(200, &json!({ "files": files })))
        }
        ("POST", "/storage/file", true) => upload(request, base, &id, user),
        (method @ ("GET" | "DELETE"), "/storage/file", false) => {
            let files = files_of(base, &id, user)?;
            let file = files
                .iter()
                .find(|f| f["filename"] == name.as_str())
                .ok_or_else(|| Error::not_found(format!("no file `{name}` in deposition {id}")))?;
            if method == "DELETE" {
                let url = format!(
                    "{base}/{id}/files/{}",
                    file["id"].as_str().unwrap_or_default()
                );
                answer(call("DELETE", &url, user).send()?, "deleting the file")?;
                return Ok(Response::status(204));
            }
            let link = file["links"]["download"]
                .as_str()
                .ok_or_else(|| Error::unavailable("the repository gave no download link"))?;
            let response = call("GET", link, user).send()?;
            let status = response.status();
            let bytes = response.bytes(64 << 20)?;
            if status >= 400 {
                return Err(Error::unavailable(format!(
                    "downloading {name}: the repository answered {status}"
                )));
            }
            Ok(Response {
                status: 200,
                headers: vec![("content-type".into(), "application/octet-stream".into())],
                body: bytes,
            })
        }
        _ => Err(Error::invalid(format!(
            "`{path}`: a folder for GET /storage/folder and POST /storage/file, a file otherwise"
        ))),
    }
}

fn project(deposition: &Value) -> Value {
    json!({ "projectId": deposition["id"], "metadata": deposition["metadata"] })
}

/// A multipart body with one file part `file` and the field `name`.
fn multipart(filename: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = "sandpipe-zenodo-port-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{filename}\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

impl Service for ZenodoPort {
    fn describe() -> ServiceDescription {
        let route = |method: &str, path: &str, summary: &str| Route {
            method: method.into(),
            path: path.into(),
            summary: summary.into(),
        };
        ServiceDescription {
            name: "zenodo-port".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            routes: vec![
                route("GET", "/metadata/project", "the user's projects"),
                route("POST", "/metadata/project", "a new project (deposition)"),
                route("GET", "/metadata/project/{id}", "one project"),
                route(
                    "PATCH",
                    "/metadata/project/{id}",
                    "its metadata, from RO-Crate",
                ),
                route("PUT", "/metadata/project/{id}", "publish it"),
                route("DELETE", "/metadata/project/{id}", "delete it"),
                route(
                    "POST",
                    "/metadata/project/{id}/files",
                    "upload files (multipart `files`)",
                ),
                route(
                    "GET",
                    "/storage/folder",
                    "the files of a deposition (`filepath` /ID/)",
                ),
                route(
                    "GET",
                    "/storage/file",
                    "a file's bytes (`filepath` /ID/NAME)",
                ),
                route(
                    "POST",
                    "/storage/file",
                    "upload files into a deposition (`filepath` /ID/)",
                ),
                route(
                    "DELETE",
                    "/storage/file",
                    "delete a file (`filepath` /ID/NAME)",
                ),
            ],
        }
    }

    fn on_query(_query: Query, reply: Reply) -> Result<(), Error> {
        reply.error(
            "io.sandpipe.zenodoPort.noQueries",
            "{0} answers its HTTP routes only",
            &["zenodo-port"],
        )
    }

    fn on_request(request: Request) -> Result<Response, Error> {
        let base = repository()?;
        let user = user(&request)?;
        let id = request.param("id").unwrap_or_default().to_owned();
        match (request.method.as_str(), request.route.as_str()) {
            ("GET", "/metadata/project") => {
                let (_, list) = answer(call("GET", &base, &user).send()?, "listing")?;
                let projects: Vec<Value> = list
                    .as_array()
                    .map(|l| l.iter().map(project).collect())
                    .unwrap_or_default();
                Ok(json_response(200, &Value::Array(projects)))
            }
            ("POST", "/metadata/project") => {
                let (_, created) = answer(
                    call("POST", &base, &user).json(&json!({})).send()?,
                    "creating a deposition",
                )?;
                let body = request.json().unwrap_or(Value::Null);
                let created = if body["metadata"].is_object() {
                    let url = format!("{base}/{}", created["id"]);
                    let metadata = deposition_metadata(&body["metadata"]);
                    answer(
                        call("PUT", &url, &user)
                            .json(&json!({ "metadata": metadata }))
                            .send()?,
                        "setting its metadata",
                    )?
                    .1
                } else {
                    created
                };
                Ok(json_response(201, &project(&created)))
            }
            ("GET", "/metadata/project/{id}") => {
                let (_, one) = answer(
                    call("GET", &format!("{base}/{id}"), &user).send()?,
                    "reading",
                )?;
                Ok(json_response(200, &project(&one)))
            }
            ("PATCH", "/metadata/project/{id}") => {
                let body = request.json()?;
                let metadata = deposition_metadata(&body["metadata"]);
                let (_, updated) = answer(
                    call("PUT", &format!("{base}/{id}"), &user)
                        .json(&json!({ "metadata": metadata }))
                        .send()?,
                    "updating the metadata",
                )?;
                Ok(json_response(200, &project(&updated)))
            }
            ("PUT", "/metadata/project/{id}") => {
                answer(
                    call("POST", &format!("{base}/{id}/actions/publish"), &user).send()?,
                    "publishing",
                )?;
                Ok(Response::status(204))
            }
            ("DELETE", "/metadata/project/{id}") => {
                answer(
                    call("DELETE", &format!("{base}/{id}"), &user).send()?,
                    "deleting",
                )?;
                Ok(Response::status(204))
            }
            ("POST", "/metadata/project/{id}/files") => upload(&request, &base, &id, &user),
            (_, route) if route.starts_with("/storage/") => storage(&request, &base, &user),
            (method, route) => Ok(json_response(
                404,
                &json!({ "error": format!("{method} {route} is not served") }),
            )),
        }
    }
}

sandpipe_sdk::export_service!(ZenodoPort);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_paths_are_a_deposition_and_a_file() {
        assert_eq!(
            storage_path("/101/a.txt").unwrap(),
            ("101".to_owned(), "a.txt".to_owned())
        );
        assert_eq!(
            storage_path("/101/").unwrap(),
            ("101".to_owned(), String::new())
        );
        assert!(storage_path("/x/a").is_err());
        assert!(storage_path("/101/a/b").is_err());
        assert!(storage_path("/").is_err());
    }

    #[test]
    fn rds_user_ids_name_their_user() {
        assert_eq!(user_of("port-zenodo://alice:s3cret"), "alice");
        assert_eq!(user_of("alice"), "alice");
    }

    #[test]
    fn ro_crate_metadata_maps_to_a_deposition() {
        let crate_ = json!({
            "@context": "https://w3id.org/ro/crate/1.1/context",
            "@graph": [
                {"@id": "ro-crate-metadata.json", "about": {"@id": "./"}},
                {"@id": "./", "@type": "Dataset", "name": "Soil samples", "description": "2026 field work",
                 "creator": [{"@id": "#ada"}, {"name": "Bob"}], "keywords": "soil, field", "license": {"@id": "cc-by-4.0"}},
                {"@id": "#ada", "@type": "Person", "name": "Ada"}
            ]
        });
        assert_eq!(
            deposition_metadata(&crate_),
            json!({"upload_type": "dataset", "title": "Soil samples", "description": "2026 field work",
                   "creators": [{"name": "Ada"}, {"name": "Bob"}], "keywords": ["soil", "field"], "license": "cc-by-4.0"})
        );
        assert_eq!(deposition_metadata(&json!({}))["title"], "Untitled");
    }
}
