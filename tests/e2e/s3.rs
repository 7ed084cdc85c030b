//! The `s3` data store against a real S3-protocol server started locally
//! (moto's server, installed by `just test-deps`): the plugin streams its
//! data object from the bucket; a missing object is dead-lettered.

use std::io::{Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::harness::Deployment;

/// A moto S3 server on a free port, killed when dropped.
pub(crate) struct S3Server {
    child: Child,
    pub(crate) port: u16,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(port: u16, request: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl S3Server {
    pub(crate) fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "cannot start moto's S3 server: run `just test-deps` (pip install 'moto[server]')",
            );
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(port, "GET / HTTP/1.0\r\n\r\n").is_none() {
            assert!(
                Instant::now() < deadline,
                "moto's S3 server did not start: run `just test-deps` (pip install 'moto[server]')"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub(crate) fn create_bucket(&self, bucket: &str) {
        let reply = http(
            self.port,
            &format!(
                "PUT /{bucket} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\r\n",
                self.port
            ),
        )
        .unwrap();
        assert!(
            reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
            "{reply}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_stream_data_objects_from_an_s3_bucket() {
    let server = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    server.create_bucket("sandpipe-test");
    let store = format!(
        "data_store:\n  type: s3\n  bucket: sandpipe-test\n  endpoint: \"http://127.0.0.1:{}\"\n  access_key_id: testing\n  secret_access_key: testing\n  allow_http: true\n",
        server.port
    );
    let d = Deployment::new(
        &[("fx-probe", "probe")],
        &format!("{store}plugins:\n  grants:\n    probe: {{ blob: true }}\n"),
    );
    let config = sandpipe::config::Config::load(&d.config).unwrap();
    let data =
        sandpipe::store::data::DataStore::new(&config.data_store, &sandpipe::tls::Tls::default())
            .unwrap();
    let object = vec![b'z'; 3 << 20];
    data.put("big/object.bin", Bytes::from(object))
        .await
        .unwrap();
    d.message(
        "a.json",
        r#"{"uuid_ref":"s3-read","data_type":"test/probe","action":"blob","data_location":"big/object.bin"}"#,
    );
    d.message(
        "b.json",
        r#"{"uuid_ref":"s3-missing","data_type":"test/probe","action":"blob","data_location":"big/nothing.bin"}"#,
    );
    let summary = d.run_once().await.unwrap();
    assert_eq!((summary.done, summary.dead), (1, 1), "{summary}");
    assert_eq!(d.last("s3-read", "probe").await.status, "done");
    let rows = d.rows("s3-missing").await;
    assert!(
        rows.last()
            .unwrap()
            .info
            .contains("data object `big/nothing.bin` not found"),
        "{rows:?}"
    );
}
