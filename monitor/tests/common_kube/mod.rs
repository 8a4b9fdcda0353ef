//! A fake Kubernetes API server (std `TcpListener`, one thread per connection) serving pod
//! lists and watch streams in the API server's own wire format, and recording every request
//! (path, query, Authorization) for the tests to check.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, VecDeque},
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub authorization: Option<String>,
}

impl Request {
    pub fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "1" || w == "true")
    }
}

/// How the next watch request is answered.
#[derive(Debug, Clone)]
pub enum Plan {
    /// 200 and the lines pushed with [`FakeApi::push`], until [`Line::Close`].
    Stream,
    /// HTTP 410 Gone (resource version too old).
    Gone,
    /// HTTP 500.
    Error,
}

#[derive(Debug, Clone)]
pub enum Line {
    Json(Value),
    Close,
}

#[derive(Default)]
struct State {
    list: Value,
    plans: VecDeque<Plan>,
    lines: VecDeque<Line>,
    requests: Vec<Request>,
    stopped: bool,
}

pub struct FakeApi {
    pub port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeApi {
    /// Listens on 127.0.0.1 (a free port), serving `list` to list requests.
    pub fn start(list: Value) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new((
            Mutex::new(State {
                list,
                ..State::default()
            }),
            Condvar::new(),
        ));
        let st = state.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                thread::spawn(move || serve(conn, st));
            }
        });
        FakeApi { port, state }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What list requests get from now on.
    pub fn set_list(&self, list: Value) {
        self.state.0.lock().unwrap().list = list;
    }

    /// How the next watch requests are answered (default: [`Plan::Stream`]).
    pub fn plan(&self, p: Plan) {
        self.state.0.lock().unwrap().plans.push_back(p);
    }

    /// A line for the open (or next) watch stream.
    pub fn push(&self, l: Line) {
        let (m, cv) = &*self.state;
        m.lock().unwrap().lines.push_back(l);
        cv.notify_all();
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.0.lock().unwrap().requests.clone()
    }

    pub fn lists(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| !r.is_watch())
            .collect()
    }

    pub fn watches(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_watch())
            .collect()
    }

    /// Waits until `n` watch requests have come, returns the last.
    pub fn wait_watch(&self, n: usize) -> Request {
        wait_for(&format!("watch request #{n}"), || {
            let w = self.watches();
            (w.len() >= n).then(|| w[n - 1].clone())
        })
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let (m, cv) = &*self.state;
        m.lock().unwrap().stopped = true;
        cv.notify_all();
    }
}

/// Polls `f` until it gives a value (10 s at most).
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn serve(conn: TcpStream, st: Arc<(Mutex<State>, Condvar)>) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let mut first = String::new();
    if r.read_line(&mut first).is_err() {
        return;
    }
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(v.trim().to_string());
        }
    }
    let target = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query: BTreeMap<String, String> = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    let req = Request {
        path: path.to_string(),
        query,
        authorization,
    };
    let (m, cv) = &*st;
    let watch = req.is_watch();
    let (plan, list) = {
        let mut s = m.lock().unwrap();
        s.requests.push(req.clone());
        let plan = if watch {
            s.plans.pop_front().unwrap_or(Plan::Stream)
        } else {
            Plan::Stream
        };
        (plan, s.list.clone())
    };
    if req.path != "/api/v1/pods" {
        let _ = w
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    if !watch {
        let body = list.to_string();
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    match plan {
        Plan::Gone => {
            let body = status_410().to_string();
            let _ = write!(
                w,
                "HTTP/1.1 410 Gone\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        Plan::Error => {
            let _ = w.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
        Plan::Stream => {
            // Chunked, as the API server streams watches.
            if w
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                .is_err()
            {
                return;
            }
            loop {
                let line = {
                    let mut s = m.lock().unwrap();
                    loop {
                        if s.stopped {
                            return;
                        }
                        if let Some(l) = s.lines.pop_front() {
                            break l;
                        }
                        s = cv.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
                    }
                };
                match line {
                    Line::Json(v) => {
                        let data = format!("{v}\n");
                        if write!(w, "{:x}\r\n{data}\r\n", data.len()).is_err() {
                            return;
                        }
                        let _ = w.flush();
                        // The API server ends a watch after an ERROR event; a handler left
                        // waiting would take lines meant for the next watch.
                        if v["type"] == "ERROR" {
                            let _ = w.write_all(b"0\r\n\r\n");
                            return;
                        }
                    }
                    Line::Close => {
                        let _ = w.write_all(b"0\r\n\r\n");
                        return;
                    }
                }
            }
        }
    }
}

/// The `Status` the API server sends for an expired resource version.
pub fn status_410() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "too old resource version: 5 (10)", "reason": "Expired", "code": 410})
}

pub fn event(kind: &str, object: Value) -> Line {
    Line::Json(json!({"type": kind, "object": object}))
}

pub fn bookmark(rv: &str) -> Line {
    event(
        "BOOKMARK",
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv,
               "annotations": {"k8s.io/initial-events-end": "true"}}}),
    )
}

pub fn error_410() -> Line {
    event("ERROR", status_410())
}

/// A `PodList` as `GET /api/v1/pods` returns it.
pub fn pod_list(rv: &str, pods: &[Value]) -> Value {
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv},
           "items": pods})
}

/// What a test pod is.
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub service_account: &'a str,
    /// (kind, name) of the controller.
    pub owner: Option<(&'a str, &'a str)>,
    pub labels: Value,
    /// Running containers' ids (containerd).
    pub containers: &'a [&'a str],
    pub init_containers: &'a [&'a str],
    pub rv: &'a str,
}

/// A pod object with the fields a real API server returns for a running pod.
pub fn pod(p: &PodSpec) -> Value {
    let owners: Vec<Value> = p
        .owner
        .iter()
        .map(|(kind, name)| {
            json!({"apiVersion": if *kind == "ReplicaSet" || *kind == "DaemonSet" || *kind == "StatefulSet" { "apps/v1" } else { "batch/v1" },
                   "kind": kind, "name": name, "uid": "0b7c5f0e-1d2a-4c3b-9e8f-7a6b5c4d3e2f",
                   "controller": true, "blockOwnerDeletion": true})
        })
        .collect();
    let status = |ids: &[&str], prefix: &str| -> Vec<Value> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                json!({"name": format!("{prefix}{i}"), "image": "registry.example/app:1.4.2",
                       "imageID": "registry.example/app@sha256:5f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c",
                       "containerID": format!("containerd://{id}"), "ready": true, "restartCount": 0,
                       "started": true, "state": {"running": {"startedAt": "2026-11-23T09:00:00Z"}}})
            })
            .collect()
    };
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": p.name, "generateName": format!("{}-", p.name.rsplit_once('-').map_or(p.name, |x| x.0)),
            "namespace": p.namespace, "uid": p.uid, "resourceVersion": p.rv,
            "creationTimestamp": "2026-11-23T08:59:58Z", "labels": p.labels,
            "ownerReferences": owners,
        },
        "spec": {
            "nodeName": p.node, "serviceAccountName": p.service_account,
            "serviceAccount": p.service_account, "restartPolicy": "Always",
            "containers": [{"name": "app0", "image": "registry.example/app:1.4.2"}],
        },
        "status": {
            "phase": "Running", "podIP": "10.244.1.17", "hostIP": "192.168.49.2",
            "qosClass": "BestEffort",
            "containerStatuses": status(p.containers, "app"),
            "initContainerStatuses": status(p.init_containers, "init"),
        },
    })
}
