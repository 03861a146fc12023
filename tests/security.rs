//! Managed-service security end to end: PostgreSQL that accepts only TLS with SCRAM (and
//! client certificates), Kafka over TLS and SASL, and secrets that never reach any output.
//! Real PostgreSQL, a real broker (tansu, behind stunnel for TLS), the real binary.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::broker::Broker;
use common::certs::Ca;
use common::ferry::{pgferry_bin, write_config, Ferry};
use common::pg::{first_column, table_checksum, try_table_checksum, PgCluster};

/// The password of the TLS-only roles.
const PASSWORD: &str = "tls-role-pw-8271";
/// The passphrase of the encrypted client key.
const KEY_PASSPHRASE: &str = "client-key-pass-5519";

/// A PostgreSQL cluster whose TCP rules accept only `hostssl` with `scram-sha-256` (and,
/// for `ferry_cert`, a client certificate naming the role), with its certificates.
struct TlsPg {
    cluster: PgCluster,
    /// The CA that signed the server and client certificates.
    ca: PathBuf,
    /// A CA that signed nothing here.
    wrong_ca: PathBuf,
    client_cert: PathBuf,
    /// Encrypted with [`KEY_PASSPHRASE`].
    client_key: PathBuf,
}

const TLS_HBA: &str = "local all all trust\n\
     hostssl all ferry_cert 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n\
     hostssl all all 127.0.0.1/32 scram-sha-256\n";

fn tls_pg() -> &'static TlsPg {
    static PG: OnceLock<TlsPg> = OnceLock::new();
    PG.get_or_init(|| {
        let files = tempfile::tempdir().expect("cert dir").keep();
        let ca = Ca::new(&files, "ca");
        let wrong = Ca::new(&files, "wrong-ca");
        let (client_cert, client_key) = ca.issue(
            &files,
            "client",
            "ferry_cert",
            &[],
            &[],
            Some(KEY_PASSPHRASE),
        );
        let ca_path = ca.cert_path.clone();
        let cluster = PgCluster::start_prepared(
            &[
                ("ssl", "on"),
                ("ssl_cert_file", "'../server.crt'"),
                ("ssl_key_file", "'../server.key'"),
                ("ssl_ca_file", "'../ca.crt'"),
            ],
            TLS_HBA,
            |dir| {
                // The server certificate names `localhost` only: connecting to 127.0.0.1
                // with verify-full must fail on the host name.
                ca.issue(dir, "server", "localhost", &["localhost"], &[], None);
                std::fs::copy(&ca_path, dir.join("ca.crt")).expect("copy CA");
            },
        );
        // Called from inside a test's runtime: make the roles on a thread with its own.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(create_roles(&cluster))
            });
        });
        TlsPg {
            cluster,
            ca: ca.cert_path,
            wrong_ca: wrong.cert_path,
            client_cert,
            client_key,
        }
    })
}

async fn create_roles(cluster: &PgCluster) {
    let admin = cluster.client("postgres").await;
    for role in ["ferry", "ferry_cert"] {
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN SUPERUSER REPLICATION PASSWORD '{PASSWORD}'"
            ))
            .await
            .expect("create role");
    }
}

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);";

/// A capture config and an apply config (replica) for `src` → `dst`, every connection made
/// with `url(db)`; `kafka_extra` is indented under `kafka:`.
fn pipeline_configs(
    url: &dyn Fn(&str) -> String,
    src: &str,
    dst: &str,
    brokers: &str,
    kafka_extra: &str,
) -> ((String, u16), (String, u16)) {
    let (cap_port, app_port) = (common::free_port(), common::free_port());
    let log = "log:\n  format: text\n  level: info,pgferry=debug\n";
    let capture = format!(
        "node_id: node-a\n\
         source:\n  url: {}\n  password: {PASSWORD}\n  slot: slot_{src}\n  publication: pub_{src}\n  \
         heartbeat_interval: 1s\n  status_interval: 1s\n\
         kafka:\n  brokers: {brokers}\n  topic_prefix: {src}\n{kafka_extra}\
         metrics:\n  listen: 127.0.0.1:{cap_port}\n{log}",
        url(src)
    );
    let apply = format!(
        "node_id: applier\n\
         kafka:\n  brokers: {brokers}\n  topic_prefix: {src}\n{kafka_extra}\
         apply:\n  mode: replica\n  nodes: [node-a]\n  targets:\n    - url: {}\n      password: {PASSWORD}\n\
         metrics:\n  listen: 127.0.0.1:{app_port}\n{log}",
        url(dst)
    );
    ((capture, cap_port), (apply, app_port))
}

/// The capture config of [`pipeline_configs`].
fn capture_yaml(
    url: &dyn Fn(&str) -> String,
    src: &str,
    dst: &str,
    brokers: &str,
    kafka_extra: &str,
) -> String {
    pipeline_configs(url, src, dst, brokers, kafka_extra).0 .0
}

/// Starts capture and apply, writes rows to `src`, and waits until `dst` matches; returns
/// both processes, still running.
async fn replicate(
    cluster: &PgCluster,
    src: &str,
    dst: &str,
    configs: ((String, u16), (String, u16)),
) -> (Ferry, Ferry) {
    let ((capture, cap_port), (apply, app_port)) = configs;
    let capture = Ferry::start(&capture, cap_port);
    capture.wait_ready().await;
    let apply = Ferry::start(&apply, app_port);
    let source = cluster.client(src).await;
    for batch in 0..10 {
        source
            .batch_execute(&format!(
                "BEGIN; INSERT INTO items SELECT g, md5(g::text) FROM generate_series({}, {}) g; \
                 UPDATE items SET note = 'u' WHERE id % 7 = 0; COMMIT;",
                batch * 50,
                batch * 50 + 49
            ))
            .await
            .expect("write");
    }
    let want = table_checksum(&source, "items").await;
    let target = cluster.client(dst).await;
    common::wait_for("the replica to match", Duration::from_secs(90), || async {
        (try_table_checksum(&target, "items").await.as_ref() == Some(&want)).then_some(())
    })
    .await;
    (capture, apply)
}

/// Runs `pgferry check` on a config; (exit success, stdout + stderr).
fn check(yaml: &str) -> (bool, String) {
    let path = write_config(yaml);
    let out = Command::new(pgferry_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .expect("run pgferry check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every backend of `role`: (backend_type, ssl, client DN).
async fn sessions(cluster: &PgCluster, role: &str) -> Vec<(String, bool, Option<String>)> {
    let admin = cluster.client("postgres").await;
    admin
        .query(
            "SELECT a.backend_type, s.ssl, s.client_dn FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.usename = $1",
            &[&role],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_over_tls_only_server_and_every_connection_encrypted() {
    let pg = tls_pg();
    let cluster = &pg.cluster;
    let (src, _) = cluster.fresh_db("tls_src", DDL).await;
    let (dst, _) = cluster.fresh_db("tls_dst", DDL).await;
    let port = cluster.port;
    let ca = pg.ca.display().to_string();
    // channel_binding=require: the SQL sessions and the replication session must both
    // authenticate with SCRAM-SHA-256-PLUS, bound to the TLS session, or fail.
    let url = |db: &str| {
        format!(
            "postgres://ferry@localhost:{port}/{db}?sslmode=verify-full&sslrootcert={ca}&channel_binding=require"
        )
    };
    let configs = pipeline_configs(&url, &src, &dst, &broker().address(), "");
    let configs_text = (configs.0 .0.clone(), configs.1 .0.clone());
    let (ok, text) = check(&configs.0 .0);
    assert!(ok, "check of the capture config failed:\n{text}");
    let (ok, text) = check(&configs.1 .0);
    assert!(ok, "check of the apply config failed:\n{text}");
    let _running = replicate(cluster, &src, &dst, configs).await;

    // While both run: every session of the role is encrypted, the walsender included.
    let sessions = sessions(cluster, "ferry").await;
    assert!(
        sessions.iter().any(|(kind, _, _)| kind == "walsender"),
        "no replication session: {sessions:?}"
    );
    assert!(
        sessions.len() >= 3,
        "expected the walsender and capture's and apply's SQL sessions: {sessions:?}"
    );
    assert!(
        sessions.iter().all(|(_, ssl, _)| *ssl),
        "a pgferry session is not encrypted: {sessions:?}"
    );

    // A CA that did not sign the server's certificate.
    let wrong = pg.wrong_ca.display().to_string();
    let wrong_ca = |db: &str| {
        format!("postgres://ferry@localhost:{port}/{db}?sslmode=verify-full&sslrootcert={wrong}")
    };
    let (ok, text) = check(&capture_yaml(
        &wrong_ca,
        &src,
        &dst,
        &broker().address(),
        "",
    ));
    assert!(!ok && text.contains("certificate verify failed"), "{text}");
    // The right CA, but a host the certificate does not name.
    let wrong_host = |db: &str| {
        format!("postgres://ferry@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={ca}")
    };
    let (ok, text) = check(&capture_yaml(
        &wrong_host,
        &src,
        &dst,
        &broker().address(),
        "",
    ));
    assert!(
        !ok && text.contains("certificate verify failed") && text.contains("address mismatch"),
        "{text}"
    );
    // status says how it is connected.
    let status_config = write_config(&configs_text.1);
    let (ok, status, err) = pgferry(&["status", "--config", status_config.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        status.contains("connection: TLS TLSv1.")
            && status.contains("sslmode verify-full: certificate and host name verified"),
        "{status}"
    );
    // A CA file that is not there is named.
    let missing_ca = |db: &str| {
        format!("postgres://ferry@localhost:{port}/{db}?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt")
    };
    let (ok, text) = check(&capture_yaml(
        &missing_ca,
        &src,
        &dst,
        &broker().address(),
        "",
    ));
    assert!(
        !ok && text.contains("cannot load sslrootcert /nonexistent/ca.crt"),
        "{text}"
    );
    // verify-ca checks the chain only, so the same host is accepted.
    let verify_ca = |db: &str| {
        format!("postgres://ferry@127.0.0.1:{port}/{db}?sslmode=verify-ca&sslrootcert={ca}")
    };
    let (ok, text) = check(&capture_yaml(
        &verify_ca,
        &src,
        &dst,
        &broker().address(),
        "",
    ));
    assert!(ok, "verify-ca: {text}");
    // Without TLS the server has no rule for the connection.
    let plain = |db: &str| format!("postgres://ferry@localhost:{port}/{db}?sslmode=disable");
    let (ok, text) = check(&capture_yaml(&plain, &src, &dst, &broker().address(), ""));
    assert!(!ok && text.contains("no encryption"), "{text}");
    // PostgreSQL 17+: TLS without the SSLRequest round trip, on both connection kinds.
    if common::pg::server_major(&cluster.bin_dir) >= 17 {
        let direct = |db: &str| format!("{}&sslnegotiation=direct", url(db));
        let (ok, text) = check(&capture_yaml(&direct, &src, &dst, &broker().address(), ""));
        assert!(ok, "sslnegotiation=direct: {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn require_refuses_a_server_without_tls() {
    // The shared cluster has ssl off: sslmode=require must not fall back to plain text.
    let cluster = PgCluster::shared();
    let (db, _) = cluster.fresh_db("notls", DDL).await;
    let port = cluster.port;
    let url = |db: &str| format!("postgres://postgres@127.0.0.1:{port}/{db}?sslmode=require");
    let (ok, text) = check(&capture_yaml(&url, &db, &db, &broker().address(), ""));
    assert!(!ok, "{text}");
    assert!(
        text.contains("server does not support TLS") || text.contains("does not accept TLS"),
        "{text}"
    );
    // prefer (the default) goes on in plain text with the same server.
    let prefer = |db: &str| format!("postgres://postgres@127.0.0.1:{port}/{db}");
    let (ok, text) = check(&capture_yaml(&prefer, &db, &db, &broker().address(), ""));
    assert!(ok, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificate_with_encrypted_key_replicates() {
    let pg = tls_pg();
    let cluster = &pg.cluster;
    let (src, _) = cluster.fresh_db("cert_src", DDL).await;
    let (dst, _) = cluster.fresh_db("cert_dst", DDL).await;
    let port = cluster.port;
    let (ca, cert, key) = (
        pg.ca.display().to_string(),
        pg.client_cert.display().to_string(),
        pg.client_key.display().to_string(),
    );
    let url = |db: &str| {
        format!(
            "postgres://ferry_cert@localhost:{port}/{db}?sslmode=verify-full&sslrootcert={ca}\
             &sslcert={cert}&sslkey={key}&sslpassword={KEY_PASSPHRASE}"
        )
    };
    // Without the certificate the server refuses the role.
    let no_cert = |db: &str| {
        format!("postgres://ferry_cert@localhost:{port}/{db}?sslmode=verify-full&sslrootcert={ca}")
    };
    let (ok, text) = check(&capture_yaml(&no_cert, &src, &dst, &broker().address(), ""));
    assert!(!ok && text.contains("certificate"), "{text}");
    // A wrong passphrase for the key is named as a key problem.
    let bad_pass = |db: &str| url(db).replace(KEY_PASSPHRASE, "not-the-passphrase");
    let (ok, text) = check(&capture_yaml(
        &bad_pass,
        &src,
        &dst,
        &broker().address(),
        "",
    ));
    assert!(!ok && text.contains("sslkey"), "{text}");

    let _running = replicate(
        cluster,
        &src,
        &dst,
        pipeline_configs(&url, &src, &dst, &broker().address(), ""),
    )
    .await;
    let sessions = sessions(cluster, "ferry_cert").await;
    assert!(
        sessions.iter().any(|(kind, _, _)| kind == "walsender"),
        "no replication session: {sessions:?}"
    );
    assert!(
        sessions
            .iter()
            .all(|(_, ssl, dn)| *ssl && dn.as_deref() == Some("/CN=ferry_cert")),
        "a session without TLS or without the client certificate: {sessions:?}"
    );
}

/// Certificates for the broker's TLS terminator: `localhost` and 127.0.0.1.
fn broker_certs() -> (PathBuf, PathBuf, PathBuf) {
    let (ca, _, cert, key) = broker_ca();
    (ca.cert_path, cert, key)
}

/// [`broker_certs`] with the CA itself (to sign client certificates) and its directory.
fn broker_ca() -> (Ca, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("cert dir").keep();
    let ca = Ca::new(&dir, "kafka-ca");
    let (cert, key) = ca.issue(
        &dir,
        "broker",
        "localhost",
        &["localhost"],
        &["127.0.0.1"],
        None,
    );
    (ca, dir, cert, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_over_tls_carries_capture_to_apply() {
    let (ca, cert, key) = broker_certs();
    let tls_broker = Broker::start_tls(&cert, &key, false, None);
    let cluster = PgCluster::shared();
    let (src, _) = cluster.fresh_db("ktls_src", DDL).await;
    let (dst, _) = cluster.fresh_db("ktls_dst", DDL).await;
    let port = cluster.port;
    let url = |db: &str| format!("postgres://postgres@127.0.0.1:{port}/{db}");
    let props = format!(
        "  properties:\n    security.protocol: SSL\n    ssl.ca.location: {}\n    \
         broker.address.family: v4\n",
        ca.display()
    );
    // Plaintext against the TLS port fails; a wrong CA fails on the certificate.
    let (ok, text) = check(&capture_yaml(&url, &src, &dst, &tls_broker.address(), ""));
    assert!(!ok && text.contains("Kafka brokers"), "{text}");
    let wrong = Ca::new(&tempfile::tempdir().unwrap().keep(), "other");
    let wrong_props = props.replace(
        &ca.display().to_string(),
        &wrong.cert_path.display().to_string(),
    );
    let (ok, text) = check(&capture_yaml(
        &url,
        &src,
        &dst,
        &tls_broker.address(),
        &wrong_props,
    ));
    assert!(!ok && text.contains("certificate verify failed"), "{text}");

    let configs = pipeline_configs(&url, &src, &dst, &tls_broker.address(), &props);
    let (ok, text) = check(&configs.0 .0);
    assert!(ok, "check over TLS failed:\n{text}");
    replicate(cluster, &src, &dst, configs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_sasl_scram_over_tls_is_negotiated() {
    let (ca, cert, key) = broker_certs();
    let sasl_broker = Broker::start_tls(&cert, &key, true, None);
    let cluster = PgCluster::shared();
    let (src, _) = cluster.fresh_db("ksasl_src", DDL).await;
    let port = cluster.port;
    let url = |db: &str| format!("postgres://postgres@127.0.0.1:{port}/{db}");
    let sasl = |mechanism: &str| {
        format!(
            "  properties:\n    security.protocol: SASL_SSL\n    sasl.mechanism: {mechanism}\n    \
             sasl.username: pgferry\n    sasl.password: sasl-secret-3321\n    \
             ssl.ca.location: {}\n    broker.address.family: v4\n",
            ca.display()
        )
    };
    // The broker requires SASL: TLS alone is refused.
    let tls_only = format!(
        "  properties:\n    security.protocol: SSL\n    ssl.ca.location: {}\n    \
         broker.address.family: v4\n",
        ca.display()
    );
    let (ok, text) = check(&capture_yaml(
        &url,
        &src,
        &src,
        &sasl_broker.address(),
        &tls_only,
    ));
    assert!(!ok && text.contains("Kafka brokers"), "{text}");
    // SCRAM-SHA-512 runs to the broker's credential check over TLS. tansu 0.6.0 offers
    // SCRAM-SHA-512 but keeps SCRAM users only in the memory of a broker without
    // --authentication (its S3 engine does not store them, its postgres engine is not built
    // in), so no user can exist on a broker that requires SASL: the exchange ends in the
    // broker's `unknown-user`, which shows the client side of SCRAM working end to end.
    let (ok, text) = check(&capture_yaml(
        &url,
        &src,
        &src,
        &sasl_broker.address(),
        &sasl("SCRAM-SHA-512"),
    ));
    assert!(
        !ok && text.contains("SASL SCRAM authentication failed") && text.contains("unknown-user"),
        "{text}"
    );
    assert!(
        !text.contains("sasl-secret-3321"),
        "the SASL password was printed:\n{text}"
    );
    // A mechanism the broker does not offer is named as such.
    let (ok, text) = check(&capture_yaml(
        &url,
        &src,
        &src,
        &sasl_broker.address(),
        &sasl("PLAIN"),
    ));
    assert!(!ok && text.contains("SASL"), "{text}");
}

/// One failing run of the binary for the redaction test.
struct Failing {
    /// What it shows.
    label: &'static str,
    /// `check`, `status` or `run`.
    command: &'static str,
    yaml: String,
    /// The marker secret somewhere in `yaml`.
    marker: &'static str,
    /// Text the output must contain, so the case fails the way it is meant to.
    expect: &'static str,
}

/// Runs one case: `run` is stopped after a few seconds of retrying; the others run to the
/// end. Returns (exit success, stdout + stderr).
fn run_case(case: &Failing) -> (bool, String) {
    let path = write_config(&case.yaml);
    let child = Command::new(pgferry_bin())
        .args([case.command, "--config", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pgferry");
    if case.command == "run" {
        let pid = child.id();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(6));
            let _ = Command::new("kill").arg(pid.to_string()).status();
        });
    }
    let out = child.wait_with_output().expect("wait for pgferry");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_any_output_of_failing_configs() {
    let pg = tls_pg();
    let port = pg.cluster.port;
    let (db, _) = pg.cluster.fresh_db("redact", DDL).await;
    let (ca, cert, key) = (
        pg.ca.display().to_string(),
        pg.client_cert.display().to_string(),
        pg.client_key.display().to_string(),
    );
    let (kca, kcert, kkey) = broker_certs();
    let sasl_broker = Broker::start_tls(&kcert, &kkey, true, None);
    let brokers = broker().address();
    let tls = format!("sslmode=verify-full&sslrootcert={ca}");
    let source = |url: String, password: &str| {
        format!(
            "node_id: redact\nsource:\n  url: {url}\n  password: {password}\n  slot: slot_{db}\n  \
             publication: pub_{db}\nkafka:\n  brokers: {brokers}\n  topic_prefix: {db}\n\
             metrics:\n  listen: 127.0.0.1:{}\nlog:\n  format: text\n  level: debug\n",
            common::free_port()
        )
    };
    let url =
        |user: &str, extra: &str| format!("postgres://{user}@localhost:{port}/{db}?{tls}{extra}");
    let kafka_only = |brokers: &str, properties: &str| {
        format!(
            "node_id: redact\nkafka:\n  brokers: {brokers}\n  properties:\n{properties}\
             log:\n  format: text\n  level: debug\n"
        )
    };
    let sasl = |password: &str, extra: &str| {
        kafka_only(
            &sasl_broker.address(),
            &format!(
                "    security.protocol: SASL_SSL\n    sasl.mechanism: SCRAM-SHA-512\n    \
                 sasl.username: pgferry\n    sasl.password: {password}\n    \
                 ssl.ca.location: {}\n    broker.address.family: v4\n{extra}",
                kca.display()
            ),
        )
    };
    let password_file = tempfile::NamedTempFile::new().unwrap().keep().unwrap().1;
    std::fs::write(&password_file, "marker-0004-pwfile\n").unwrap();
    let cases = vec![
        Failing {
            label: "wrong source password, check",
            command: "check",
            yaml: source(url("ferry", ""), "marker-0001-srcpw"),
            marker: "marker-0001-srcpw",
            expect: "password authentication failed",
        },
        Failing {
            label: "wrong source password, status",
            command: "status",
            yaml: source(url("ferry", ""), "marker-0002-status"),
            marker: "marker-0002-status",
            expect: "unreachable",
        },
        Failing {
            label: "wrong source password, run (debug log)",
            command: "run",
            yaml: source(url("ferry", ""), "marker-0003-runpw"),
            marker: "marker-0003-runpw",
            expect: "password authentication failed",
        },
        Failing {
            label: "wrong target password from a file",
            command: "check",
            yaml: format!(
                "node_id: redact\nkafka:\n  brokers: {brokers}\n  topic_prefix: {db}\n\
                 apply:\n  mode: replica\n  nodes: [x]\n  targets:\n    - url: {}\n      \
                 password_file: {}\n",
                url("ferry", ""),
                password_file.display()
            ),
            marker: "marker-0004-pwfile",
            expect: "password authentication failed",
        },
        Failing {
            label: "wrong password inside the URL",
            command: "check",
            yaml: source(url("ferry:marker-0005-inurl", ""), "marker-0005-inurl"),
            marker: "marker-0005-inurl",
            expect: "password authentication failed",
        },
        Failing {
            label: "wrong sslpassword for the client key",
            command: "check",
            yaml: source(
                url(
                    "ferry_cert",
                    &format!("&sslcert={cert}&sslkey={key}&sslpassword=marker-0006-keypass"),
                ),
                PASSWORD,
            ),
            marker: "marker-0006-keypass",
            expect: "sslkey",
        },
        Failing {
            label: "wrong SASL password",
            command: "check",
            yaml: sasl("marker-0007-saslpw", ""),
            marker: "marker-0007-saslpw",
            expect: "SASL",
        },
        Failing {
            label: "librdkafka rejects a property and quotes its value",
            command: "check",
            yaml: sasl(
                "marker-0008-saslpw",
                "    sasl.jaas.config: \"org.apache.kafka.common.security.scram.ScramLoginModule required password=marker-0008-jaas;\"\n",
            ),
            marker: "marker-0008-jaas",
            expect: "sasl.jaas.config",
        },
        Failing {
            label: "bad ssl.key.pem with a key password",
            command: "check",
            yaml: sasl(
                "marker-0009-saslpw",
                "    ssl.key.pem: \"marker-0009-notpem\"\n    ssl.certificate.pem: \"marker-0009-notpem\"\n    ssl.key.password: marker-0009-keypw\n",
            ),
            marker: "marker-0009",
            expect: "ssl",
        },
        Failing {
            label: "a keystore that does not exist, with its password",
            command: "check",
            yaml: sasl(
                "marker-0010-saslpw",
                "    ssl.keystore.location: /nonexistent/keystore.p12\n    ssl.keystore.password: marker-0010-kspw\n",
            ),
            marker: "marker-0010",
            expect: "keystore",
        },
        Failing {
            label: "an invalid protocol beside a SASL password",
            command: "check",
            yaml: kafka_only(
                &brokers,
                "    security.protocol: SASL_BOGUS\n    sasl.password: marker-0011-bogus\n",
            ),
            marker: "marker-0011-bogus",
            expect: "security.protocol",
        },
        Failing {
            label: "a config error elsewhere, with a password set",
            command: "check",
            yaml: source(url("ferry", ""), "marker-0012-cfgerr")
                .replace("  slot:", "  heartbeat_interval: banana\n  slot:"),
            marker: "marker-0012-cfgerr",
            expect: "heartbeat_interval",
        },
        Failing {
            label: "OAUTHBEARER client secret without a token endpoint, run",
            command: "run",
            yaml: source(url("ferry", ""), PASSWORD).replace(
                "  topic_prefix:",
                "  properties:\n    security.protocol: SASL_SSL\n    sasl.mechanism: OAUTHBEARER\n    \
                 sasl.oauthbearer.method: oidc\n    sasl.oauthbearer.client.id: pgferry\n    \
                 sasl.oauthbearer.client.secret: marker-0013-oidc\n  topic_prefix:",
            ),
            marker: "marker-0013-oidc",
            expect: "oauthbearer",
        },
    ];
    assert!(cases.len() >= 10);
    // The cases wait on network timeouts, so they run side by side.
    let results: Vec<(bool, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|case| scope.spawn(|| run_case(case)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (case, (ok, text)) in cases.iter().zip(&results) {
        assert!(
            text.to_lowercase().contains(&case.expect.to_lowercase()),
            "{}: the output does not say {:?}:\n{text}",
            case.label,
            case.expect
        );
        if case.command == "check" {
            assert!(!ok, "{}: check passed:\n{text}", case.label);
        }
        assert!(
            !text.contains(case.marker),
            "{}: a secret reached the output:\n{text}",
            case.label
        );
    }
}

/// `X/Y` text of an LSN.
fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[tokio::test(flavor = "multi_thread")]
async fn records_for_system_or_unannounced_tables_are_dead_lettered_never_applied() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cluster = PgCluster::shared();
    // `other` is published and announced, but apply.tables leaves it out: filtered.
    let other = "CREATE TABLE other (id int PRIMARY KEY);";
    let (master, source) = cluster.fresh_db("admit_m", &format!("{DDL} {other}")).await;
    // `secret` exists only on the replica: the source never published it.
    let (replica, target) = cluster
        .fresh_db(
            "admit_r",
            &format!("{DDL} CREATE TABLE secret (id int PRIMARY KEY); {other}"),
        )
        .await;
    let capture = Ferry::capture(cluster, &master, &broker().address(), "");
    capture.wait_ready().await;
    let port = common::free_port();
    let applier = Ferry::start(
        &common::ferry::apply_config(
            "node-a",
            &master,
            &[cluster.url(&replica)],
            &broker().address(),
            port,
            "  tables: [public.items]\n",
        ),
        port,
    );
    source
        .batch_execute("INSERT INTO other VALUES (7); INSERT INTO items VALUES (1, 'first')")
        .await
        .unwrap();
    common::wait_for("the first row", Duration::from_secs(60), || async {
        let rows = target.query("SELECT 1 FROM items", &[]).await.ok()?;
        (rows.len() == 1).then_some(())
    })
    .await;

    // A forged transaction on the node stream, ordered after everything applied so far.
    let current: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let (hi, lo) = current.split_once('/').unwrap();
    let lsn =
        (u64::from_str_radix(hi, 16).unwrap() << 32) + u64::from_str_radix(lo, 16).unwrap() + 1;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let lsn = lsn_text(lsn);
    let forged = [
        format!(r#"{{"type":"begin","commit_lsn":"{lsn}","commit_ts_us":{now_us}}}"#),
        r#"{"type":"relation","schema":"pg_catalog","table":"pg_authid","columns":[{"name":"rolname","type":"name","key":true},{"name":"rolsuper","type":"boolean"}]}"#.to_owned(),
        r#"{"type":"change","op":"u","schema":"pg_catalog","table":"pg_authid","before":{"rolname":"postgres"},"after":{"rolname":"postgres","rolsuper":false}}"#.to_owned(),
        r#"{"type":"change","op":"c","schema":"public","table":"secret","after":{"id":42}}"#.to_owned(),
        r#"{"type":"change","op":"d","schema":"pgferry","table":"apply_progress","before":{"source_node":"node-a"}}"#.to_owned(),
        format!(r#"{{"type":"commit","commit_lsn":"{lsn}","changes":3}}"#),
    ];
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker().address())
        .create()
        .unwrap();
    let node_topic = format!("{master}.__node.node-a");
    for item in &forged {
        producer
            .send(BaseRecord::<(), str>::to(&node_topic).payload(item.as_str()))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    // Real changes after it still apply.
    source
        .batch_execute("INSERT INTO items VALUES (2, 'after')")
        .await
        .unwrap();
    common::wait_for(
        "the row after the forged records",
        Duration::from_secs(60),
        || async {
            let rows = target
                .query("SELECT 1 FROM items WHERE id = 2", &[])
                .await
                .ok()?;
            (rows.len() == 1).then_some(())
        },
    )
    .await;

    let letters: Vec<(Option<String>, String)> = target
        .query(
            "SELECT table_name, error FROM pgferry.dead_letters ORDER BY kafka_offset, item",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let refused = |table: &str, why: &str| {
        letters
            .iter()
            .any(|(t, e)| t.as_deref() == Some(table) && e.contains(why))
    };
    assert!(
        refused("pg_catalog.pg_authid", "never announced"),
        "{letters:?}"
    );
    assert!(
        refused("pg_catalog.pg_authid", "never applied"),
        "{letters:?}"
    );
    assert!(
        refused("public.secret", "never announced on this node stream"),
        "{letters:?}"
    );
    assert!(
        refused("pgferry.apply_progress", "never applied"),
        "{letters:?}"
    );
    assert_eq!(letters.len(), 4, "{letters:?}");
    // Nothing of it was applied.
    let superuser: bool = target
        .query_one(
            "SELECT rolsuper FROM pg_authid WHERE rolname = 'postgres'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(superuser);
    let secret: i64 = target
        .query_one("SELECT count(*) FROM secret", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(secret, 0);
    let progress: i64 = target
        .query_one("SELECT count(*) FROM pgferry.apply_progress", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(progress, 1);
    assert_eq!(
        applier.metric("pgferry_apply_dead_letters_total", ""),
        Some(4.0)
    );
    // The announced table outside apply.tables was skipped, not applied, not dead-lettered.
    let others: i64 = target
        .query_one("SELECT count(*) FROM other", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(others, 0);
    assert_eq!(
        applier.metric("pgferry_apply_filtered_total", ""),
        Some(1.0)
    );
}

/// Runs `pgferry <args>`; (exit success, stdout, stderr).
fn pgferry(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(pgferry_bin())
        .args(args)
        .output()
        .expect("run pgferry");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Executes `pgferry roles` output as a superuser: each `\connect <db>` section on its
/// database.
async fn run_roles_script(cluster: &PgCluster, script: &str) {
    let mut db: Option<String> = None;
    let mut chunk = String::new();
    let mut sections = Vec::new();
    for line in script.lines() {
        if let Some(name) = line.strip_prefix("\\connect ") {
            if let Some(db) = db.take() {
                sections.push((db, std::mem::take(&mut chunk)));
            }
            db = Some(name.trim_matches('"').to_owned());
        } else if db.is_some() {
            chunk.push_str(line);
            chunk.push('\n');
        }
    }
    if let Some(db) = db {
        sections.push((db, chunk));
    }
    assert!(!sections.is_empty(), "no \\connect section in:\n{script}");
    for (db, sql) in sections {
        cluster
            .client(&db)
            .await
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("roles script on {db}: {e:?}\n{sql}"));
    }
}

/// A replica pipeline `src` → `dst` on the shared (trusting) cluster whose capture connects
/// as role `cap`, given its grants by `pgferry roles` (returned, run); apply connects as
/// `postgres`.
async fn capture_role_pipeline(
    cluster: &PgCluster,
    src: &str,
    dst: &str,
    cap: &str,
) -> ((String, u16), (String, u16), String) {
    let port = cluster.port;
    let url = |db: &str| {
        let user = if db == src { cap } else { "postgres" };
        format!("postgres://{user}@127.0.0.1:{port}/{db}")
    };
    let ((capture, cap_port), (apply, app_port)) =
        pipeline_configs(&url, src, dst, &broker().address(), "");
    let capture = capture.replace(&format!("  password: {PASSWORD}\n"), "");
    let apply = apply.replace(&format!("      password: {PASSWORD}\n"), "");
    let path = write_config(&capture);
    let (ok, script, err) = pgferry(&["roles", "--config", path.to_str().unwrap()]);
    assert!(ok, "pgferry roles failed: {err}");
    run_roles_script(cluster, &script).await;
    ((capture, cap_port), (apply, app_port), script)
}

#[tokio::test(flavor = "multi_thread")]
async fn least_privilege_roles_from_pgferry_roles_capture_and_apply() {
    let cluster = PgCluster::shared();
    let (src, _) = cluster.fresh_db("lp_src", DDL).await;
    let (dst, target) = cluster.fresh_db("lp_dst", DDL).await;
    let (cap, app) = (format!("cap_{src}"), format!("app_{dst}"));
    // The roles exist but hold nothing yet.
    let admin = cluster.client("postgres").await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {cap} LOGIN; CREATE ROLE {app} LOGIN;"
        ))
        .await
        .unwrap();
    let port = cluster.port;
    let url = |db: &str| {
        let user = if db == src { &cap } else { &app };
        format!("postgres://{user}@127.0.0.1:{port}/{db}")
    };
    let ((capture, cap_port), (apply, app_port)) =
        pipeline_configs(&url, &src, &dst, &broker().address(), "");
    // The password lines are for the TLS cluster; this one trusts loopback.
    let (capture, apply) = (
        capture.replace(&format!("  password: {PASSWORD}\n"), ""),
        apply.replace(&format!("      password: {PASSWORD}\n"), ""),
    );

    let (ok, text) = check(&capture);
    assert!(!ok, "{text}");
    for named in [
        format!("the source role {cap} has neither REPLICATION nor SUPERUSER"),
        format!("role {cap} cannot SELECT public.items"),
        format!("role {cap} may not create it FOR ALL TABLES"),
        "schema changes would not be replicated: pgferry's event triggers are not installed"
            .to_owned(),
    ] {
        assert!(
            text.contains(&named),
            "check does not say {named:?}:\n{text}"
        );
    }
    let (ok, text) = check(&apply);
    assert!(!ok, "{text}");
    for named in [
        format!("role {app} on apply target"),
        "may not SET session_replication_role".to_owned(),
        "may not EXECUTE pg_replication_origin_".to_owned(),
        "lacks SELECT, INSERT, UPDATE, DELETE or TRUNCATE on public.items".to_owned(),
    ] {
        assert!(
            text.contains(&named),
            "check does not say {named:?}:\n{text}"
        );
    }

    for config in [&capture, &apply] {
        let path = write_config(config);
        let (ok, script, err) = pgferry(&["roles", "--config", path.to_str().unwrap()]);
        assert!(ok, "pgferry roles failed: {err}");
        run_roles_script(cluster, &script).await;
    }
    let (ok, text) = check(&capture);
    assert!(ok, "capture config after pgferry roles:\n{text}");
    let (ok, text) = check(&apply);
    assert!(ok, "apply config after pgferry roles:\n{text}");
    let supers: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname IN ($1, $2) AND rolsuper",
            &[&cap, &app],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(supers, 0);

    // Applied schema changes alter the target's tables, which only their owner may do.
    target
        .batch_execute(&format!("ALTER TABLE items OWNER TO {app}"))
        .await
        .unwrap();
    let _running = replicate(
        cluster,
        &src,
        &dst,
        ((capture, cap_port), (apply, app_port)),
    )
    .await;
    let rows: i64 = target
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows > 0);

    // DDL by an application role that owns its table and has nothing in schema pgferry: the
    // administrator's event triggers capture it (before they ran as the invoking role, and
    // every such CREATE or ALTER TABLE failed with "permission denied for schema pgferry").
    let owner = format!("own_{src}");
    admin
        .batch_execute(&format!("CREATE ROLE {owner} LOGIN"))
        .await
        .unwrap();
    let source = cluster.client(&src).await;
    source
        .batch_execute(&format!(
            "ALTER TABLE items OWNER TO {owner}; GRANT SELECT ON items TO {cap}"
        ))
        .await
        .unwrap();
    source
        .batch_execute(&format!(
            "SET ROLE {owner}; ALTER TABLE items ADD COLUMN extra int; \
             UPDATE items SET extra = id WHERE id % 10 = 0; \
             CREATE TEMP TABLE scratch (id int); RESET ROLE"
        ))
        .await
        .expect("DDL by a table owner without rights in schema pgferry");
    let want = table_checksum(&source, "items").await;
    common::wait_for(
        "the added column on the replica",
        Duration::from_secs(60),
        || async {
            (try_table_checksum(&target, "items").await.as_ref() == Some(&want)).then_some(())
        },
    )
    .await;
}

/// Row-level security: a policy hides half of `tenants` from a capture role without
/// `BYPASSRLS`. Its snapshot never copies only the rows the policy shows (before, it copied
/// those silently while the stream sent every row's changes, and a re-snapshot pruned the
/// rest from replicas): capture stops, naming the table and what to grant, and the replica
/// holds none of it. `pgferry roles` grants `BYPASSRLS`; with it, after a restart, every row
/// arrives.
#[tokio::test(flavor = "multi_thread")]
async fn row_level_security_never_thins_a_snapshot() {
    let cluster = PgCluster::shared();
    let tables = "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);
                  CREATE TABLE tenants (id int PRIMARY KEY, tenant text NOT NULL, v int);";
    let (src, source) = cluster.fresh_db("rls_src", tables).await;
    let (dst, target) = cluster.fresh_db("rls_dst", tables).await;
    source
        .batch_execute(
            "INSERT INTO tenants SELECT g, (ARRAY['x', 'y'])[g % 2 + 1], g FROM generate_series(1, 1000) g;
             ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
             CREATE POLICY only_x ON tenants USING (tenant = 'x');",
        )
        .await
        .unwrap();
    let cap = format!("cap_{src}");
    let ((capture, cap_port), (apply, app_port), _) =
        capture_role_pipeline(cluster, &src, &dst, &cap).await;
    let admin = cluster.client("postgres").await;
    let bypass = |admin: tokio_postgres::Client, cap: String| async move {
        admin
            .query_one(
                "SELECT rolbypassrls FROM pg_roles WHERE rolname = $1",
                &[&cap],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    };
    assert!(
        bypass(cluster.client("postgres").await, cap.clone()).await,
        "pgferry roles grants BYPASSRLS"
    );
    // A role without it (an older script, or a service that does not grant it).
    admin
        .batch_execute(&format!("ALTER ROLE {cap} NOBYPASSRLS"))
        .await
        .unwrap();
    let _apply = Ferry::start(&apply, app_port);
    let mut capture = Ferry::start(&capture, cap_port);
    let refusal = common::wait_for(
        "capture to refuse the snapshot",
        Duration::from_secs(90),
        || async {
            capture
                .log()
                .lines()
                .find(|l| l.contains("may not read every row of public.tenants"))
                .map(str::to_owned)
        },
    )
    .await;
    assert!(
        refusal.contains("BYPASSRLS") && refusal.contains("row-level security"),
        "{refusal}"
    );
    let copied: i64 = target
        .query_one("SELECT count(*) FROM tenants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(copied, 0, "no part of the table may be copied");

    admin
        .batch_execute(&format!("ALTER ROLE {cap} BYPASSRLS"))
        .await
        .unwrap();
    capture.kill9();
    capture.restart();
    let want = table_checksum(&source, "tenants").await;
    common::wait_for("every row of tenants", Duration::from_secs(90), || async {
        (try_table_checksum(&target, "tenants").await.as_ref() == Some(&want)).then_some(())
    })
    .await;
    let rows: i64 = target
        .query_one("SELECT count(*) FROM tenants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1000);
}

/// A table the capture role may not read never stops the stream. `pgferry roles` grants
/// `pg_read_all_data` for a `FOR ALL TABLES` publication (a table created later is published
/// at once, and snapshotted); without it (an older script, a service that does not grant it),
/// a table an application role creates with `CREATE TABLE … AS` (whose rows reach targets
/// only through its snapshot) cannot be read: its snapshot waits, naming the table, while the
/// other tables' changes keep arriving; once `SELECT` is granted it is copied, without a
/// restart. Before, the capture stage stopped until an operator granted it.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_capture_may_not_read_waits_while_the_stream_goes_on() {
    let cluster = PgCluster::shared();
    let (src, source) = cluster.fresh_db("unread_src", DDL).await;
    let (dst, target) = cluster.fresh_db("unread_dst", DDL).await;
    let (cap, owner) = (format!("cap_{src}"), format!("own_{src}"));
    let ((capture, cap_port), (apply, app_port), script) =
        capture_role_pipeline(cluster, &src, &dst, &cap).await;
    assert!(
        script.contains(&format!("GRANT pg_read_all_data TO \"{cap}\"")),
        "{script}"
    );
    let admin = cluster.client("postgres").await;
    admin
        .batch_execute(&format!(
            "REVOKE pg_read_all_data FROM {cap}; CREATE ROLE {owner} LOGIN"
        ))
        .await
        .unwrap();
    source
        .batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {owner}"))
        .await
        .unwrap();
    let _apply = Ferry::start(&apply, app_port);
    let capture = Ferry::start(&capture, cap_port);
    capture.wait_ready().await;
    let mut rng = common::Rng::new(u64::from(cluster.port));
    let rows = rng.range(200, 2000);
    source
        .batch_execute(&format!(
            "SET ROLE {owner};
             CREATE TABLE later AS SELECT g AS id, md5(g::text) AS note FROM generate_series(1, {rows}) g;
             ALTER TABLE later ADD PRIMARY KEY (id);
             RESET ROLE;"
        ))
        .await
        .unwrap();
    common::wait_for(
        "capture to put the table's snapshot aside",
        Duration::from_secs(90),
        || async {
            capture
                .log()
                .lines()
                .any(|l| l.contains("may not read every row of public.later"))
                .then_some(())
        },
    )
    .await;
    // The stream goes on: changes to the other table, made after the refusal, arrive.
    for i in 0..rng.range(20, 60) {
        source
            .execute(
                "INSERT INTO items VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET note = $2",
                &[&(rng.range(1, 40) as i32), &format!("n{i}")],
            )
            .await
            .unwrap();
    }
    let want = table_checksum(&source, "items").await;
    common::wait_for("items on the replica", Duration::from_secs(60), || async {
        (try_table_checksum(&target, "items").await.as_ref() == Some(&want)).then_some(())
    })
    .await;
    let copied: i64 = target
        .query_one("SELECT count(*) FROM later", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    assert_eq!(copied, 0, "no row of a table the role may not read");
    source
        .batch_execute(&format!("GRANT SELECT ON later TO {cap}"))
        .await
        .unwrap();
    let want = table_checksum(&source, "later").await;
    common::wait_for("every row of later", Duration::from_secs(90), || async {
        (try_table_checksum(&target, "later").await.as_ref() == Some(&want)).then_some(())
    })
    .await;
}

/// Row-level security on a target: an apply role without `BYPASSRLS` that is not the table's
/// owner would see only the rows a policy shows, and its updates and deletes of the other rows
/// would change nothing, silently. Apply sessions run with `row_security = off`, so such a
/// statement fails instead: each change of the table is dead-lettered naming row-level
/// security, and the table is diverged. `pgferry roles` grants the apply role `BYPASSRLS`;
/// with it back, a replay makes the table exact. Random rows, tenants and writes.
#[tokio::test(flavor = "multi_thread")]
async fn row_level_security_on_a_target_never_hides_rows_from_apply() {
    let cluster = PgCluster::shared();
    let mut rng = common::Rng::new(u64::from(cluster.port) + 7);
    let rows = rng.range(50, 300);
    let tables = format!(
        "{DDL} CREATE TABLE tenants (id int PRIMARY KEY, tenant text NOT NULL, v int);
         INSERT INTO tenants SELECT g, (ARRAY['x', 'y'])[g % 2 + 1], g FROM generate_series(1, {rows}) g;"
    );
    let (src, source) = cluster.fresh_db("trls_src", &tables).await;
    let (dst, target) = cluster.fresh_db("trls_dst", &tables).await;
    target
        .batch_execute(
            "ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
             CREATE POLICY only_x ON tenants USING (tenant = 'x');",
        )
        .await
        .unwrap();
    let app = format!("app_{dst}");
    let port = cluster.port;
    let url = |db: &str| {
        let user = if db == dst { app.as_str() } else { "postgres" };
        format!("postgres://{user}@127.0.0.1:{port}/{db}")
    };
    let ((capture, cap_port), (apply, app_port)) =
        pipeline_configs(&url, &src, &dst, &broker().address(), "");
    let capture = capture.replace(&format!("  password: {PASSWORD}\n"), "");
    let apply = apply.replace(&format!("      password: {PASSWORD}\n"), "");
    let apply_path = write_config(&apply);
    let (ok, script, err) = pgferry(&["roles", "--config", apply_path.to_str().unwrap()]);
    assert!(ok, "pgferry roles failed: {err}");
    assert!(
        script.contains(&format!("\"{app}\" LOGIN BYPASSRLS")),
        "pgferry roles grants the apply role BYPASSRLS:\n{script}"
    );
    run_roles_script(cluster, &script).await;
    let admin = cluster.client("postgres").await;
    // A role without it (an older script, or a service that does not grant it).
    admin
        .batch_execute(&format!("ALTER ROLE {app} NOBYPASSRLS"))
        .await
        .unwrap();
    let capture = Ferry::start(&capture, cap_port);
    capture.wait_ready().await;
    let _apply = Ferry::start(&apply, app_port);
    for _ in 0..rng.range(20, 80) {
        let id = rng.range(1, rows + 20) as i32;
        let sql = match rng.range(0, 3) {
            0 => format!(
                "INSERT INTO tenants VALUES ({id}, '{}', {}) \
                 ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                if rng.chance(0.5) { "x" } else { "y" },
                rng.range(0, 1000)
            ),
            1 => format!("UPDATE tenants SET v = v + 1 WHERE id = {id}"),
            _ => format!("DELETE FROM tenants WHERE id = {id}"),
        };
        source.batch_execute(&sql).await.unwrap();
    }
    source
        .batch_execute("INSERT INTO items VALUES (1, 'last')")
        .await
        .unwrap();
    let want = table_checksum(&source, "items").await;
    common::wait_for("the last item", Duration::from_secs(90), || async {
        (try_table_checksum(&target, "items").await.as_ref() == Some(&want)).then_some(())
    })
    .await;
    // Nothing silent: the table parks, its first letter naming row-level security and what
    // to grant, its later changes behind it in order; the other table went on (above).
    let letters: Vec<String> = first_column(
        &target,
        "SELECT error FROM pgferry.dead_letters
          WHERE table_name = 'public.tenants' AND resolved_at IS NULL ORDER BY id",
    )
    .await;
    let (first, later) = letters
        .split_first()
        .expect("the table's changes are dead-lettered");
    assert!(
        first.starts_with("access to the table refused on the target")
            && first.contains("row-level security")
            && first.contains("BYPASSRLS"),
        "{first}"
    );
    for error in later {
        assert!(error.starts_with("parked behind"), "{error}");
    }
    admin
        .batch_execute(&format!("ALTER ROLE {app} BYPASSRLS"))
        .await
        .unwrap();
    let (ok, out, err) = pgferry(&[
        "dead-letters",
        "replay",
        "--config",
        apply_path.to_str().unwrap(),
        "--all",
    ]);
    assert!(ok, "{out}{err}");
    let want = table_checksum(&source, "tenants").await;
    common::wait_for(
        "tenants on the replica",
        Duration::from_secs(60),
        || async {
            (try_table_checksum(&target, "tenants").await.as_ref() == Some(&want)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_mutual_tls_with_an_encrypted_client_key() {
    let (ca, dir, cert, key) = broker_ca();
    let (client_cert, client_key) = ca.issue(
        &dir,
        "client",
        "pgferry",
        &[],
        &[],
        Some("kafka-key-pass-771"),
    );
    let broker = Broker::start_tls(&cert, &key, false, Some(&ca.cert_path));
    let cluster = PgCluster::shared();
    let (src, _) = cluster.fresh_db("kmtls_src", DDL).await;
    let (dst, _) = cluster.fresh_db("kmtls_dst", DDL).await;
    let port = cluster.port;
    let url = |db: &str| format!("postgres://postgres@127.0.0.1:{port}/{db}");
    let props = |with_cert: bool| {
        let mut p = format!(
            "  properties:\n    security.protocol: SSL\n    ssl.ca.location: {}\n    \
             broker.address.family: v4\n",
            ca.cert_path.display()
        );
        if with_cert {
            p.push_str(&format!(
                "    ssl.certificate.location: {}\n    ssl.key.location: {}\n    \
                 ssl.key.password: kafka-key-pass-771\n",
                client_cert.display(),
                client_key.display()
            ));
        }
        p
    };
    // Without a client certificate the terminator ends the handshake.
    let (ok, text) = check(&capture_yaml(
        &url,
        &src,
        &dst,
        &broker.address(),
        &props(false),
    ));
    assert!(!ok && text.contains("certificate required"), "{text}");
    let configs = pipeline_configs(&url, &src, &dst, &broker.address(), &props(true));
    let (ok, text) = check(&capture_yaml(
        &url,
        &src,
        &dst,
        &broker.address(),
        &props(true),
    ));
    assert!(ok, "check with the client certificate:\n{text}");
    assert!(!text.contains("kafka-key-pass-771"), "{text}");
    let _running = replicate(cluster, &src, &dst, configs).await;
}
