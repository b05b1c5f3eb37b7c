//! Hub repo ids, end to end and offline: the `kandinsky` binary downloads tiny fixture
//! pipelines from a fake Hugging Face hub on 127.0.0.1 (started here), into the standard
//! cache, and then runs from that cache with the server gone.
//!
//! The server answers what hf-hub 0.4's sync client asks (`api/sync.rs`): for each file a
//! metadata `GET {endpoint}/{repo}/resolve/main/{file}` with `Range: bytes=0-0` on a client
//! that does not follow redirects, reading `x-repo-commit`, `x-linked-etag` (else `etag`) and
//! `content-range` (`bytes 0-0/{size}`); then the download, a `GET` of the same URL with
//! `Range: bytes={start}-` on a client that follows redirects. Like the hub, weights (LFS
//! files) answer the resolve URL with a 302 to an absolute CDN URL, the etag header carrying
//! the blob's id, and a missing file is a 404 (`x-error-code: EntryNotFound`). hf-hub stores
//! the body as `blobs/{etag}` and links `snapshots/{commit}/{file}` to it.
//!
//! Every run gets `HF_ENDPOINT` (this server, or a closed port), its own `HF_HOME` and no
//! proxy variables, so no test can reach the real network.

mod common;

use common::{fixtures, ok, pixels, scratch, tiny, write_png};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// FNV-1a: a stable content id standing in for the hub's sha256 etags.
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

/// A repo the fake hub serves: path in the repo → file on disk, at one commit.
#[derive(Clone)]
struct Repo {
    commit: String,
    files: BTreeMap<String, PathBuf>,
}

impl Repo {
    /// Every file under a fixture pipeline folder (following its symlinks).
    fn from_dir(dir: &Path) -> Self {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                    out.insert(rel, p);
                }
            }
        }
        let mut files = BTreeMap::new();
        walk(dir, dir, &mut files);
        let commit = etag(dir.to_string_lossy().as_bytes()).repeat(2)[..40].to_string();
        Self { commit, files }
    }

    fn without(mut self, path: &str) -> Self {
        assert!(self.files.remove(path).is_some(), "{path}");
        self
    }

    fn with(mut self, path: &str, file: PathBuf) -> Self {
        self.files.insert(path.to_string(), file);
        self
    }
}

struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Response {
    fn error(status: u16, code: &str) -> Self {
        Self {
            status,
            headers: vec![("X-Error-Code", code.to_string())],
            body: code.as_bytes().to_vec(),
        }
    }

    /// 206 for `Range: bytes=a-[b]` (what hf-hub always sends), else 200.
    fn content(
        bytes: Vec<u8>,
        range: Option<&str>,
        mut headers: Vec<(&'static str, String)>,
    ) -> Self {
        let len = bytes.len();
        let Some((a, b)) = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
        else {
            return Self {
                status: 200,
                headers,
                body: bytes,
            };
        };
        let start: usize = a.parse().unwrap();
        let end = b.parse::<usize>().map_or(len - 1, |b| b.min(len - 1));
        headers.push(("Content-Range", format!("bytes {start}-{end}/{len}")));
        Self {
            status: 206,
            headers,
            body: bytes[start..=end].to_vec(),
        }
    }
}

/// The fake hub: a thread accepting connections, one request per connection.
struct Hub {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

struct State {
    url: String,
    repos: BTreeMap<String, Repo>,
    /// etag → file, for the CDN URLs weights redirect to.
    blobs: BTreeMap<String, PathBuf>,
}

impl State {
    fn respond(&self, target: &str, range: Option<&str>) -> Response {
        if let Some(id) = target.strip_prefix("/cdn/") {
            return match self.blobs.get(id) {
                Some(p) => Response::content(std::fs::read(p).unwrap(), range, vec![]),
                None => Response::error(404, "EntryNotFound"),
            };
        }
        let parts: Vec<&str> = target.trim_start_matches('/').splitn(5, '/').collect();
        let [org, name, "resolve", revision, file] = parts.as_slice() else {
            return Response::error(404, "NotFound");
        };
        // The hub answers an unknown repo 401 to anonymous clients.
        let Some(repo) = self.repos.get(&format!("{org}/{name}")) else {
            return Response::error(401, "RepoNotFound");
        };
        if *revision != "main" {
            return Response::error(404, "RevisionNotFound");
        }
        let commit = ("X-Repo-Commit", repo.commit.clone());
        let Some(path) = repo.files.get(*file) else {
            let mut r = Response::error(404, "EntryNotFound");
            r.headers.push(commit);
            return r;
        };
        let bytes = std::fs::read(path).unwrap();
        let id = etag(&bytes);
        if file.ends_with(".safetensors") || file.ends_with(".bin") {
            // LFS: the etag of the resolve answer is the git pointer's, the blob id rides in
            // x-linked-etag, the bytes come from the CDN.
            return Response {
                status: 302,
                headers: vec![
                    commit,
                    ("ETag", format!("\"{}\"", etag(id.as_bytes()))),
                    ("X-Linked-Etag", format!("\"{id}\"")),
                    ("X-Linked-Size", bytes.len().to_string()),
                    ("Location", format!("{}/cdn/{id}", self.url)),
                ],
                body: Vec::new(),
            };
        }
        Response::content(bytes, range, vec![commit, ("ETag", format!("\"{id}\""))])
    }
}

fn serve(conn: TcpStream, state: &State, log: &Mutex<Vec<String>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let r = if method == "GET" {
        state.respond(target, range.as_deref())
    } else {
        Response::error(405, "MethodNotAllowed")
    };
    log.lock().unwrap().push(format!("{} {target}", r.status));
    let mut out = format!("HTTP/1.1 {} X\r\n", r.status);
    for (k, v) in &r.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.body.len()
    ));
    let mut conn = conn;
    conn.write_all(out.as_bytes())?;
    conn.write_all(&r.body)?;
    conn.flush()
}

impl Hub {
    fn start(repos: &[(&str, Repo)]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut blobs = BTreeMap::new();
        for (_, repo) in repos {
            for p in repo.files.values() {
                blobs.insert(etag(&std::fs::read(p).unwrap()), p.clone());
            }
        }
        let state = Arc::new(State {
            url: format!("http://{addr}"),
            repos: repos
                .iter()
                .map(|(id, r)| (id.to_string(), r.clone()))
                .collect(),
            blobs,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (state, log) = (state.clone(), log2.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &state, &log);
                });
            }
        });
        Self {
            addr,
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `"<status> <path>"` of every request so far.
    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Close the port: later connections are refused.
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        assert!(TcpStream::connect(self.addr).is_err(), "server still up");
    }
}

/// Where a run looks for the hub and keeps its caches.
struct Env {
    endpoint: String,
    hf_home: PathBuf,
    xdg_cache: PathBuf,
    offline: bool,
}

fn kandinsky(args: &[&str], env: &Env) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kandinsky"));
    cmd.args(args)
        .env("HF_ENDPOINT", &env.endpoint)
        .env("HF_HOME", &env.hf_home)
        .env("XDG_CACHE_HOME", &env.xdg_cache)
        .env_remove("HF_HUB_OFFLINE");
    // ureq honours proxy variables; 127.0.0.1 must be reached directly.
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(v);
    }
    if env.offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    cmd.output().expect("the binary runs")
}

/// `controlnet` at 64×64, 2 steps; `models` adds `--prior` / `--decoder` (else the defaults,
/// kandinsky-community/kandinsky-2-2-prior and kandinsky-2-2-controlnet-depth).
fn controlnet(hint: &Path, out: &Path, models: &[&str], env: &Env) -> Output {
    let (hint, out) = (hint.display().to_string(), out.display().to_string());
    let mut args = vec![
        "controlnet",
        "--prompt",
        "a red cat",
        "--hint",
        &hint,
        "--steps",
        "2",
        "--prior-steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "7",
        "--out",
        &out,
    ];
    args.extend(models);
    kandinsky(&args, env)
}

const PRIOR: &str = "kandinsky-community/kandinsky-2-2-prior";
const CONTROLNET: &str = "kandinsky-community/kandinsky-2-2-controlnet-depth";
/// The prior with only PyTorch pickle weights for `prior/`, as the hub's ControlNet repo has
/// for `unet/`.
const PICKLE_PRIOR: &str = "test-org/prior-pickle-only";

fn repo_cache(hf_home: &Path, repo: &str) -> PathBuf {
    hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")))
}

#[test]
fn hub_repos_download_into_the_cache_and_then_run_offline() {
    let d = scratch("download");
    let hint = d.join("hint.png");
    write_png(&hint, 64, 64, |x, y| [(x * 4) as u8, (y * 4) as u8, 128]);
    let xdg_cache = d.join("xdg");

    // The reference: the same flow from the local folders.
    let local_png = d.join("local.png");
    let (prior_dir, cn_dir) = (
        tiny("kandinsky-2-2-prior"),
        tiny("kandinsky-2-2-controlnet-depth"),
    );
    let (prior_s, cn_s) = (
        prior_dir.display().to_string(),
        cn_dir.display().to_string(),
    );
    let nowhere = Env {
        endpoint: "http://127.0.0.1:9".into(),
        hf_home: d.join("unused-hf-home"),
        xdg_cache: xdg_cache.clone(),
        offline: true,
    };
    ok(&controlnet(
        &hint,
        &local_png,
        &["--prior", &prior_s, "--decoder", &cn_s],
        &nowhere,
    ));
    let reference = pixels(&local_png);

    let prior_repo = Repo::from_dir(&prior_dir);
    let pickle_repo = prior_repo
        .clone()
        .without("prior/diffusion_pytorch_model.safetensors")
        .with(
            "prior/diffusion_pytorch_model.bin",
            fixtures().join("pickle/prior.bin"),
        );
    let cn_repo = Repo::from_dir(&cn_dir);
    let hub = Hub::start(&[
        (PRIOR, prior_repo.clone()),
        (CONTROLNET, cn_repo.clone()),
        (PICKLE_PRIOR, pickle_repo.clone()),
    ]);
    let hf_home = d.join("hf-home");
    let online = Env {
        endpoint: hub.url(),
        hf_home: hf_home.clone(),
        xdg_cache: xdg_cache.clone(),
        offline: false,
    };

    // 1. The CLI's default repo ids, downloaded.
    let hub_png = d.join("hub.png");
    ok(&controlnet(&hint, &hub_png, &[], &online));
    assert_eq!(
        pixels(&hub_png),
        reference,
        "hub run differs from the local run"
    );
    // The standard cache layout: refs/main → commit, snapshots/<commit>/<file> → blobs/<etag>.
    for (repo, served) in [(PRIOR, &prior_repo), (CONTROLNET, &cn_repo)] {
        let cache = repo_cache(&hf_home, repo);
        let commit = std::fs::read_to_string(cache.join("refs/main")).unwrap();
        assert_eq!(commit, served.commit, "{repo}");
        let snapshot = cache.join("snapshots").join(&commit);
        assert!(snapshot.join("model_index.json").is_file(), "{repo}");
        for (file, source) in &served.files {
            let cached = snapshot.join(file);
            if !cached.exists() {
                continue;
            }
            let bytes = std::fs::read(source).unwrap();
            let link = std::fs::read_link(&cached).unwrap();
            assert!(
                link.ends_with(Path::new("blobs").join(etag(&bytes))),
                "{file} → {}",
                link.display()
            );
            assert_eq!(std::fs::read(&cached).unwrap(), bytes, "{file}");
        }
    }
    let cn_snapshot = repo_cache(&hf_home, CONTROLNET)
        .join("snapshots")
        .join(&cn_repo.commit);
    for f in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "movq/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ] {
        assert!(cn_snapshot.join(f).is_file(), "{f} not in the snapshot");
    }
    let log = hub.requests();
    assert!(
        !log.iter().any(|r| r.ends_with(".bin")),
        "asked for pickle weights while safetensors exist: {log:?}"
    );

    // 2. A repo whose component has only the .bin: the safetensors 404, the .bin follows.
    let pickle_png = d.join("pickle.png");
    ok(&controlnet(
        &hint,
        &pickle_png,
        &["--prior", PICKLE_PRIOR],
        &online,
    ));
    assert_eq!(pixels(&pickle_png), reference, "pickle-only prior differs");
    let log = hub.requests();
    let asked = |s: &str| log.iter().position(|r| r == s);
    let st_404 = asked(&format!(
        "404 /{PICKLE_PRIOR}/resolve/main/prior/diffusion_pytorch_model.safetensors"
    ));
    let bin = asked(&format!(
        "302 /{PICKLE_PRIOR}/resolve/main/prior/diffusion_pytorch_model.bin"
    ));
    assert!(
        matches!((st_404, bin), (Some(a), Some(b)) if a < b),
        "{log:?}"
    );
    let pickle_snapshot = repo_cache(&hf_home, PICKLE_PRIOR)
        .join("snapshots")
        .join(&pickle_repo.commit);
    assert!(pickle_snapshot
        .join("prior/diffusion_pytorch_model.bin")
        .is_file());
    assert!(!pickle_snapshot
        .join("prior/diffusion_pytorch_model.safetensors")
        .exists());

    // 3. Server gone: HF_HUB_OFFLINE=1 runs both from the cache.
    let endpoint = hub.url();
    hub.stop();
    let offline = Env {
        endpoint,
        offline: true,
        ..online
    };
    let cached_png = d.join("cached.png");
    ok(&controlnet(&hint, &cached_png, &[], &offline));
    assert_eq!(pixels(&cached_png), reference);
    ok(&controlnet(
        &hint,
        &cached_png,
        &["--prior", PICKLE_PRIOR],
        &offline,
    ));
    assert_eq!(pixels(&cached_png), reference);
}

#[test]
fn missing_hub_files_are_clear_errors() {
    let d = scratch("missing");
    let hint = d.join("hint.png");
    write_png(&hint, 64, 64, |_, _| [10, 20, 30]);
    let cn = Repo::from_dir(&tiny("kandinsky-2-2-controlnet-depth"));
    let no_weights = cn
        .clone()
        .without("unet/diffusion_pytorch_model.safetensors");
    let no_config = cn.clone().without("movq/config.json");
    let hub = Hub::start(&[
        (PRIOR, Repo::from_dir(&tiny("kandinsky-2-2-prior"))),
        ("test-org/no-unet-weights", no_weights),
        ("test-org/no-movq-config", no_config),
    ]);
    let env = Env {
        endpoint: hub.url(),
        hf_home: d.join("hf-home"),
        xdg_cache: d.join("xdg"),
        offline: false,
    };
    let out = d.join("o.png");
    let fails_with = |decoder: &str, needles: &[&str]| {
        let o = controlnet(&hint, &out, &["--decoder", decoder], &env);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{decoder} should fail");
        assert!(!err.contains("panicked"), "{err}");
        for n in needles {
            assert!(err.contains(n), "expected `{n}` in: {err}");
        }
    };
    // Neither weight file: both alternatives are named.
    fails_with(
        "test-org/no-unet-weights",
        &[
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "404",
        ],
    );
    fails_with("test-org/no-movq-config", &["movq/config.json", "404"]);
    // A repo the hub does not know (401, not a missing file): the download error.
    fails_with(
        "test-org/no-such-repo",
        &["model_index.json", "download failed"],
    );
    let log = hub.requests();
    assert!(
        log.iter()
            .any(|r| r
                == "404 /test-org/no-unet-weights/resolve/main/unet/diffusion_pytorch_model.bin"),
        "{log:?}"
    );
    hub.stop();
}
