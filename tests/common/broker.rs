//! A real tansu broker (Kafka protocol) on a loopback port: in-memory storage, or durable
//! storage (tansu's S3 engine against a local moto S3 server) for tests that restart it.

use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::process::{on_test_exit, signal};

/// Where `scripts/setup` installs tansu, unless `TANSU_BIN` says otherwise.
pub fn tansu_bin() -> String {
    std::env::var("TANSU_BIN").unwrap_or_else(|_| format!("{}/bin/tansu", super::tools_dir()))
}

/// Waits until something accepts connections on `port`.
fn wait_listening(what: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One moto S3 server per test process (`scripts/setup --test` installs it): the port. It
/// lives as long as the process; the watchdog kills it after.
fn s3_server() -> u16 {
    static S3: OnceLock<(u16, Mutex<Child>)> = OnceLock::new();
    S3.get_or_init(|| {
        let port = super::free_port();
        let bin = format!("{}/moto/bin/moto_server", super::tools_dir());
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin} (run scripts/setup --test): {e}"));
        on_test_exit(&format!("kill -9 {} 2>/dev/null", child.id()));
        wait_listening("moto (S3)", port);
        (port, Mutex::new(child))
    })
    .0
}

/// How a broker keeps its data.
#[derive(Clone)]
enum Storage {
    Memory,
    /// A bucket on the local S3 server: survives broker restarts.
    S3 {
        port: u16,
        bucket: String,
    },
}

/// A running broker; killed on drop.
pub struct Broker {
    pub port: u16,
    storage: Storage,
    log: std::path::PathBuf,
    child: Mutex<Child>,
    /// Where clients are told to connect (this broker's port unless a TLS terminator is in
    /// front of it).
    advertised: String,
    /// tansu's `--authentication` (SASL required).
    authentication: bool,
    /// stunnel in front of it, for [`Broker::start_tls`].
    terminator: Option<Mutex<Child>>,
}

impl Broker {
    /// Starts tansu with in-memory storage and waits until it accepts connections.
    pub fn start() -> Broker {
        Broker::start_with(Storage::Memory)
    }

    /// Starts tansu with storage that outlives the process, so [`Broker::restart`] keeps
    /// every acknowledged record.
    pub fn start_durable() -> Broker {
        let port = s3_server();
        let bucket = format!("tansu-{}", super::free_port());
        let created = super::http_request(port, "PUT", &format!("/{bucket}"));
        assert!(
            matches!(created, Some((200, _))),
            "cannot create bucket {bucket} on the local S3 server: {created:?}"
        );
        Broker::start_with(Storage::S3 { port, bucket })
    }

    fn start_with(storage: Storage) -> Broker {
        let port = super::free_port();
        Broker::start_listening(storage, port, format!("tcp://127.0.0.1:{port}"), false)
    }

    fn start_listening(
        storage: Storage,
        port: u16,
        advertised: String,
        authentication: bool,
    ) -> Broker {
        let log = tempfile::NamedTempFile::new()
            .expect("log file")
            .keep()
            .expect("keep")
            .1;
        let child = spawn(port, &storage, &log, &advertised, authentication);
        Broker {
            port,
            storage,
            log,
            child: Mutex::new(child),
            advertised,
            authentication,
            terminator: None,
        }
    }

    /// tansu (in-memory) behind stunnel, which terminates TLS with `cert`/`key` on
    /// [`Broker::port`]. tansu 0.6.0 has `--cert`/`--key` flags, but the two conflict on its
    /// command line and a certificate alone does not turn TLS on for its listener, so the
    /// TLS end is Debian's stunnel4. tansu advertises `localhost:<TLS port>`, so clients come
    /// back through the terminator and check the certificate against `localhost`.
    /// `authentication`: tansu requires SASL (it offers SCRAM-SHA-512). `client_ca`: the
    /// terminator requires a client certificate that this CA signed (mutual TLS).
    pub fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        authentication: bool,
        client_ca: Option<&std::path::Path>,
    ) -> Broker {
        let tls_port = super::free_port();
        let plain_port = super::free_port();
        let mut broker = Broker::start_listening(
            Storage::Memory,
            plain_port,
            format!("tcp://localhost:{tls_port}"),
            authentication,
        );
        let dir = tempfile::tempdir().expect("stunnel dir").keep();
        let conf = dir.join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{tls_port}\n\
                 connect = 127.0.0.1:{plain_port}\ncert = {}\nkey = {}\n{}",
                cert.display(),
                key.display(),
                client_ca
                    .map(|ca| format!(
                        "requireCert = yes\nverifyChain = yes\nCAfile = {}\n",
                        ca.display()
                    ))
                    .unwrap_or_default()
            ),
        )
        .expect("write stunnel.conf");
        let child = Command::new("stunnel4")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start stunnel4 (run scripts/setup --test): {e}"));
        on_test_exit(&format!("kill -9 {} 2>/dev/null", child.id()));
        wait_listening("stunnel", tls_port);
        broker.port = tls_port;
        broker.terminator = Some(Mutex::new(child));
        broker
    }

    /// The broker's own log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether its records survive [`Broker::restart`].
    pub fn is_durable(&self) -> bool {
        matches!(self.storage, Storage::S3 { .. })
    }

    /// `host:port` for clients.
    pub fn address(&self) -> String {
        if self.terminator.is_some() {
            format!("localhost:{}", self.port)
        } else {
            format!("127.0.0.1:{}", self.port)
        }
    }

    /// Freezes the broker process (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(&self.child(), "-STOP");
    }

    /// Resumes a paused broker.
    pub fn resume(&self) {
        signal(&self.child(), "-CONT");
    }

    /// `kill -9` the broker, wait `down`, and start it again on the same port and storage.
    /// Only a durable broker keeps its records.
    pub fn restart(&self, down: Duration) {
        assert!(
            self.is_durable(),
            "restarting an in-memory broker loses every record; use Broker::start_durable"
        );
        let mut child = self.child();
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(down);
        *child = spawn(
            self.port,
            &self.storage,
            &self.log,
            &self.advertised,
            self.authentication,
        );
    }
}

/// Starts tansu on `port` and waits until it listens.
fn spawn(
    port: u16,
    storage: &Storage,
    log: &std::path::Path,
    advertised: &str,
    authentication: bool,
) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    let mut command = Command::new(tansu_bin());
    command.args([
        "broker",
        "--listener-url",
        &url,
        "--advertised-listener-url",
        advertised,
    ]);
    if authentication {
        command.arg("--authentication");
    }
    match storage {
        Storage::Memory => {
            command.args(["--storage-engine", "memory://tansu/"]);
        }
        Storage::S3 { port, bucket } => {
            command
                .args(["--storage-engine", &format!("s3://{bucket}/")])
                .env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
                .env("AWS_ALLOW_HTTP", "true")
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_DEFAULT_REGION", "us-east-1");
        }
    }
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("start tansu at {} (run scripts/setup): {e}", tansu_bin()));
    on_test_exit(&format!("kill -9 {} 2>/dev/null", child.id()));
    wait_listening("tansu", port);
    child
}

impl Drop for Broker {
    fn drop(&mut self) {
        let mut child = self.child();
        let _ = child.kill();
        let _ = child.wait();
        if let Some(t) = &self.terminator {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            let _ = t.kill();
            let _ = t.wait();
        }
    }
}
