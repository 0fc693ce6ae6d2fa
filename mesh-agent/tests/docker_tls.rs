//! Root only (CI runs as root): the agent reaching a Swarm manager's Engine API over TCP with
//! TLS, the way the docker CLI does (`--docker-host tcp://… --docker-tls-verify
//! --docker-cert-path DIR`).
//!
//! The test makes a CA, a server certificate (SAN `IP:127.0.0.1`) and a client certificate
//! with the `openssl` CLI, plus a second CA for the negatives; starts a private dockerd
//! (`common/dockerd.rs`) that also listens on `tcp://127.0.0.1:2376` with `--tlsverify` (the
//! port is its own network namespace's); and checks:
//! - refusals, with messages that say why: a cert directory without `key.pem` (`mesh-agent
//!   run` exits at once naming the file), the wrong CA (`invalid peer certificate`, from the
//!   library and from `mesh-agent run`, which gives up after its initial timeout), a client
//!   certificate the daemon does not trust (the daemon's alert), plain HTTP to the TLS port;
//! - the right certificates reach the manager (`service_exists` over TLS);
//! - `mesh-agent run --runtime docker` over TLS makes the published port of a 3-task service
//!   answer, 10 requests per task out of 30, and follows a scale-up (events over TLS).
//!
//! Skipped (with the reason printed) only when dockerd cannot start here.

#[path = "common/agent_proc.rs"]
mod agent_proc;
#[path = "common/cmd.rs"]
mod cmd;
#[path = "common/dockerd.rs"]
mod dockerd;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use agent_proc::AgentProc;
use dockerd::{Dockerd, eventually as eventually_every};
use mesh_agent::source::{
    Source,
    swarm::{self, DockerEndpoint, SwarmSource, TlsOptions},
};

const IMAGE: &str = "mesh-busybox:test";
/// The daemon's TLS port, in its own network namespace.
const PORT: u16 = 2376;

// ---- certificates ------------------------------------------------------------------------

/// `openssl args…` in `dir`, which must succeed.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (install it: xtask/setup.sh does): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An EC P-256 key at `dir/name`.
fn key(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ],
    );
}

/// A self-signed CA `name.pem` with key `name-key.pem`.
fn ca(dir: &Path, name: &str) {
    let key_file = format!("{name}-key.pem");
    key(dir, &key_file);
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\n",
    )
    .unwrap();
    let subj = format!("/CN=mesh test {name}");
    openssl(
        dir,
        &[
            "req", "-new", "-key", &key_file, "-subj", &subj, "-out", "ca.csr",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-signkey",
            &key_file,
            "-days",
            "2",
            "-sha256",
            "-extfile",
            "ca.ext",
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A leaf certificate `name.pem` (key `name-key.pem`) signed by CA `ca`, with extensions
/// `ext` (SAN, extended key usage).
fn leaf(dir: &Path, name: &str, ca: &str, cn: &str, ext: &str, serial: u32) {
    let key_file = format!("{name}-key.pem");
    key(dir, &key_file);
    let ext_file = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext_file),
        format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}\n"),
    )
    .unwrap();
    let csr = format!("{name}.csr");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &key_file,
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-set_serial",
            &serial.to_string(),
            "-days",
            "2",
            "-sha256",
            "-extfile",
            &ext_file,
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A docker cert directory `dir/name` with `ca.pem`, `cert.pem`, `key.pem` copied from the
/// given files of `dir` (`None`: left out).
fn cert_dir(dir: &Path, name: &str, ca: &str, cert: &str, key: Option<&str>) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(dir.join(format!("{ca}.pem")), d.join("ca.pem")).unwrap();
    std::fs::copy(dir.join(format!("{cert}.pem")), d.join("cert.pem")).unwrap();
    if let Some(k) = key {
        std::fs::copy(dir.join(format!("{k}.pem")), d.join("key.pem")).unwrap();
    }
    d
}

struct Pki {
    /// The daemon's files.
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// Cert directories for the agent.
    good: PathBuf,
    wrong_ca: PathBuf,
    foreign_client: PathBuf,
    no_key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    ca(dir, "ca");
    ca(dir, "other-ca");
    leaf(
        dir,
        "server",
        "ca",
        "127.0.0.1",
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1",
        1,
    );
    leaf(
        dir,
        "client",
        "ca",
        "mesh-agent",
        "extendedKeyUsage=clientAuth",
        2,
    );
    leaf(
        dir,
        "foreign",
        "other-ca",
        "mesh-agent",
        "extendedKeyUsage=clientAuth",
        3,
    );
    Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        good: cert_dir(dir, "good", "ca", "client", Some("client-key")),
        wrong_ca: cert_dir(dir, "wrong-ca", "other-ca", "client", Some("client-key")),
        foreign_client: cert_dir(dir, "foreign-client", "ca", "foreign", Some("foreign-key")),
        no_key: cert_dir(dir, "no-key", "ca", "client", None),
    }
}

// ---- the agent ---------------------------------------------------------------------------

/// `mesh-agent run --runtime docker` in `d`'s namespace, over TLS with the cert
/// directory `certs`; `tag` names its pins, run directory and log.
fn start_agent(d: &Dockerd, tmp: &Path, tag: &str, certs: &Path) -> AgentProc {
    let log = tmp.join(format!("{tag}.log"));
    let pins = PathBuf::from(format!("/sys/fs/bpf/mesh-tls-{}-{tag}", std::process::id()));
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args([
            "run",
            "--runtime",
            "docker",
            "--no-dns",
            "--metrics-addr",
            "none",
            "--resync-ms",
            "500",
        ])
        .args([
            "--docker-host",
            &format!("tcp://127.0.0.1:{PORT}"),
            "--docker-tls-verify",
        ])
        .arg("--docker-cert-path")
        .arg(certs)
        .arg("--netns")
        .arg(format!("/run/netns/{}", d.netns))
        .arg("--pin-dir")
        .arg(&pins)
        .arg("--run-dir")
        .arg(tmp.join(format!("{tag}-run")))
        // Only the flags: the environment must not add settings.
        .env_remove("MESH_DOCKER_HOST")
        .env_remove("MESH_CONFIG")
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .expect("start mesh-agent");
    AgentProc {
        child: Some(child),
        log,
        pins,
    }
}

fn eventually<T>(why: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    eventually_every(why, timeout, Duration::from_millis(300), f)
}

// ---- helpers -----------------------------------------------------------------------------

/// The TLS endpoint with the cert directory `certs`.
fn tls_endpoint(certs: &Path) -> Result<DockerEndpoint, swarm::SwarmError> {
    DockerEndpoint::resolve(
        Some(&format!("tcp://127.0.0.1:{PORT}")),
        &TlsOptions {
            verify: true,
            cert_path: Some(certs.to_path_buf()),
            ..Default::default()
        },
    )
}

/// Run `f` on a fresh single-threaded runtime inside `d`'s network namespace (where the
/// daemon's 127.0.0.1 is).
fn in_netns<T: Send + 'static>(d: &Dockerd, f: impl AsyncFnOnce() -> T + Send + 'static) -> T {
    let ns = PathBuf::from(format!("/run/netns/{}", d.netns));
    mesh_agent::netns::run_in(&ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .expect("enter the daemon's namespace")
}

/// `initial()` of a source on `endpoint`, one attempt: its error's text.
fn initial_error(d: &Dockerd, endpoint: DockerEndpoint) -> String {
    in_netns(d, async move || {
        let mut src = SwarmSource::new(endpoint).with_initial_timeout(Duration::ZERO);
        match src.initial().await {
            Ok(s) => panic!("connected: {} services", s.services.len()),
            Err(e) => e.to_string(),
        }
    })
}

// ---- the test ----------------------------------------------------------------------------

#[test]
fn mesh_reaches_the_manager_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    let pki = make_pki(&pki_dir);
    let host = format!("tcp://127.0.0.1:{PORT}");
    let s = |p: &Path| p.display().to_string();
    let (ca, cert, key) = (s(&pki.ca), s(&pki.server_cert), s(&pki.server_key));
    let mut d = match Dockerd::start_with(&[
        "--tlsverify",
        "--tlscacert",
        &ca,
        "--tlscert",
        &cert,
        "--tlskey",
        &key,
        "-H",
        &host,
    ]) {
        Ok(d) => d,
        Err(why) => {
            // Only when dockerd cannot start here; CI installs docker.io so that it does.
            eprintln!("SKIPPED: dockerd cannot start: {why}");
            return;
        }
    };

    // ---- refusals ------------------------------------------------------------------------
    // No key.pem in the cert directory: `mesh-agent run` stops at once, naming the file.
    let mut no_key = start_agent(&d, tmp.path(), "no-key", &pki.no_key);
    let st = no_key
        .wait_exit(Duration::from_secs(10))
        .expect("mesh-agent run exits without key.pem");
    let text = no_key.log();
    eprintln!("no key.pem, mesh-agent run says: {}", text.trim());
    assert!(!st.success(), "{text}");
    let key_path = pki.no_key.join("key.pem").display().to_string();
    assert!(
        text.contains(&key_path) && text.contains("client key"),
        "names the missing key:\n{text}"
    );
    assert!(text.contains("No such file"), "{text}");
    // The wrong CA, through `mesh-agent run`: it retries for its initial timeout (30 s),
    // then exits with the TLS error. It runs while the swarm is set up below.
    let mut wrong_ca_agent = start_agent(&d, tmp.path(), "wrong-ca", &pki.wrong_ca);

    // The same, one attempt through the library.
    let text = initial_error(&d, tls_endpoint(&pki.wrong_ca).unwrap());
    eprintln!("wrong CA: {text}");
    assert!(text.contains(&host), "names the endpoint: {text}");
    assert!(
        text.contains("invalid peer certificate") && text.contains("UnknownIssuer"),
        "{text}"
    );
    // A client certificate of another CA: the daemon refuses it.
    let text = initial_error(&d, tls_endpoint(&pki.foreign_client).unwrap());
    eprintln!("foreign client certificate: {text}");
    assert!(text.contains(&host), "{text}");
    assert!(
        text.contains("received fatal alert") && text.contains("Certificate"),
        "{text}"
    );
    // Plain HTTP to the TLS port.
    let text = initial_error(&d, DockerEndpoint::try_from(host.as_str()).unwrap());
    eprintln!("plain TCP: {text}");
    assert!(text.contains("HTTPS server"), "{text}");
    // The right certificates: the daemon answers (it is no swarm manager yet).
    let text = initial_error(&d, tls_endpoint(&pki.good).unwrap());
    assert!(text.contains("not a swarm manager"), "{text}");

    // ---- a swarm and a service -----------------------------------------------------------
    d.swarm_init();
    d.import_busybox(IMAGE);
    d.web_service(IMAGE, 3, &[], Duration::from_secs(90));
    let good = tls_endpoint(&pki.good).unwrap();
    let exists = in_netns(&d, async move || swarm::service_exists(&good, "web").await);
    assert!(exists.expect("service_exists over TLS"), "`web` exists");
    let good = tls_endpoint(&pki.good).unwrap();
    let src = in_netns(&d, async move || {
        let mut src = SwarmSource::new(good).with_initial_timeout(Duration::from_secs(20));
        let s = src.initial().await;
        (
            src.describe(),
            s.map(|s| s.running_tasks("web").count())
                .map_err(|e| e.to_string()),
        )
    });
    assert_eq!(src.0, format!("swarm:{host} (TLS)"));
    assert_eq!(src.1, Ok(3), "the state over TLS");

    // ---- the agent over TLS --------------------------------------------------------------
    let mut agent = start_agent(&d, tmp.path(), "agent", &pki.good);
    eventually("agent ready", Duration::from_secs(60), || {
        let log = agent.log();
        assert!(
            agent
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None))),
            "agent exited:\n{log}"
        );
        log.contains("agent ready").then_some(())
    });
    assert!(
        agent.log().contains(&format!("swarm:{host} (TLS)")),
        "{}",
        agent.log()
    );
    let hosts = d.task_hosts("web");
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    eventually(
        "the published port answers",
        Duration::from_secs(30),
        || d.curl("http://127.0.0.1:8080/"),
    );
    let answers: Vec<String> = (0..30)
        .map(|_| d.curl("http://127.0.0.1:8080/").unwrap_or_default())
        .collect();
    let mut tally = BTreeMap::new();
    for a in &answers {
        *tally.entry(a.clone()).or_insert(0) += 1;
    }
    assert_eq!(
        tally.keys().cloned().collect::<BTreeSet<_>>(),
        hosts,
        "{tally:?}\n{}",
        agent.log()
    );
    assert!(tally.values().all(|&n| n == 10), "10 each: {tally:?}");

    // Events and syncs over TLS: a scale-up is followed.
    d.docker_ok(&["service", "scale", "-d", "web=4"]);
    d.wait_running("web", 4, Duration::from_secs(90));
    let hosts4 = d.task_hosts("web");
    eventually(
        "4 tasks behind the published port",
        Duration::from_secs(40),
        || {
            let got: BTreeSet<String> = (0..12)
                .filter_map(|_| d.curl("http://127.0.0.1:8080/"))
                .collect();
            (got == hosts4).then_some(())
        },
    );
    assert!(agent.stop(), "clean exit:\n{}", agent.log());
    assert!(!agent.pins.exists(), "pins removed");

    // The wrong-CA agent has given up by now (or does within its 30 s), saying why.
    let st = wrong_ca_agent
        .wait_exit(Duration::from_secs(45))
        .expect("the wrong-CA agent gives up");
    let text = wrong_ca_agent.log();
    eprintln!(
        "wrong CA, mesh-agent run says: {}",
        text.lines().last().unwrap_or_default()
    );
    assert!(!st.success(), "{text}");
    assert!(
        text.contains(&host) && text.contains("invalid peer certificate"),
        "{text}"
    );
    assert!(!text.contains("agent ready"), "{text}");
    drop(d);
}
