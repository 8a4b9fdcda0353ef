//! File inspection off the capture loop. The capture loop only enqueues a file (by identity)
//! and later takes the verdict, so the ring buffer keeps draining whatever a file costs: a
//! worker thread finds the file, opens it (the very file that was mapped or executed, not
//! whatever is at its path now), and reads its symbols within a [`Budget`]. A read the
//! budget cannot interrupt (a FUSE file whose server never answers) leaves the worker stuck:
//! the attacher sees that through [`Inspector::stuck`] and starts another.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    time::{Duration, Instant},
};

use super::{
    elf::{self, Budget, FileId, InspectError},
    site::{self, Placed},
    target::{self, Target},
};

/// How to find the file to inspect.
#[derive(Debug, Clone)]
pub enum Locate {
    /// A path in our own root (the host's libraries at start).
    Path(PathBuf),
    /// The program process `tgid` executes (`/proc/<tgid>/exe`).
    Exe { tgid: u32 },
    /// A file process `tgid` maps executable through its descriptor `fd` (the mmap record
    /// comes at the call's entry: the mapping may not be there yet, the descriptor is), or
    /// else the mapping with the job's identity.
    Mapping { tgid: u32, fd: Option<i32> },
}

#[derive(Debug)]
pub struct Job {
    pub id: FileId,
    pub locate: Locate,
}

#[derive(Debug)]
pub enum Outcome {
    /// The process had exited, or no longer mapped the file.
    Gone,
    /// `path` names the file in logs; the open file is what probes are attached through.
    Inspected {
        path: PathBuf,
        /// With each probe's site, decoded here too: reading the functions' code is file I/O
        /// like the inspection, and must not run on the capture loop either.
        result: Result<Option<(File, Target, Vec<Placed>)>, InspectError>,
    },
}

#[derive(Debug)]
pub struct Verdict {
    pub id: FileId,
    pub outcome: Outcome,
    pub took: Duration,
}

pub struct Inspector {
    jobs: SyncSender<Job>,
    verdicts: Receiver<Verdict>,
    /// The job being run and since when.
    current: Arc<Mutex<Option<(FileId, Instant)>>>,
}

impl Inspector {
    /// Starts the worker; `queue` jobs at most wait for it.
    pub fn start(budget: Budget, queue: usize) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::sync_channel::<Job>(queue);
        let (tx, verdicts) = mpsc::channel();
        let current = Arc::new(Mutex::new(None));
        let busy = current.clone();
        std::thread::Builder::new()
            .name("inspect".into())
            .spawn(move || {
                for job in rx {
                    let t0 = Instant::now();
                    *busy.lock().unwrap_or_else(|p| p.into_inner()) = Some((job.id, t0));
                    let outcome = run(&job, budget);
                    *busy.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let v = Verdict {
                        id: job.id,
                        outcome,
                        took: t0.elapsed(),
                    };
                    if tx.send(v).is_err() {
                        break; // abandoned
                    }
                }
            })?;
        Ok(Inspector {
            jobs,
            verdicts,
            current,
        })
    }

    /// Queues `job`; gives it back when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(j) | TrySendError::Disconnected(j) => j,
        })
    }

    pub fn try_verdict(&self) -> Option<Verdict> {
        self.verdicts.try_recv().ok()
    }

    /// Waits up to `timeout` for a verdict.
    pub fn wait_verdict(&self, timeout: Duration) -> Option<Verdict> {
        self.verdicts.recv_timeout(timeout).ok()
    }

    /// The file the worker has been on for longer than `limit`, if any.
    pub fn stuck(&self, limit: Duration) -> Option<FileId> {
        let cur = *self.current.lock().unwrap_or_else(|p| p.into_inner());
        cur.filter(|(_, since)| since.elapsed() > limit)
            .map(|(id, _)| id)
    }
}

/// Where a file may be opened, best first.
enum Candidate {
    /// A magic link of /proc that names the inode itself (a process's path is looked up in
    /// its mount namespace, which its user may have changed: a FIFO bind-mounted there).
    /// Another file there means the process moved on (closed the descriptor, executed
    /// something else).
    Exact(PathBuf),
    /// A path, when the links cannot be opened (without CAP_SYS_ADMIN for map_files).
    Path(PathBuf),
}

fn run(job: &Job, budget: Budget) -> Outcome {
    let Some((path, candidates)) = candidates(job) else {
        return Outcome::Gone;
    };
    let mut refused = None;
    // The path only when no link could be opened for want of permission: a link that names
    // another file, or none, means the process has moved on, and so has its path.
    let mut path_ok = true;
    for c in candidates {
        let (p, exact) = match &c {
            Candidate::Exact(p) => (p, true),
            Candidate::Path(p) if path_ok => (p, false),
            Candidate::Path(_) => continue,
        };
        match elf::open_regular(p, Some(job.id)) {
            Ok(file) => {
                let result = target::inspect_file(&file, &path, budget).map(|t| {
                    t.map(|t| {
                        let placed = site::plan_file(&file, &t);
                        (file, t, placed)
                    })
                });
                return Outcome::Inspected { path, result };
            }
            Err(e) if !exact => refused = Some(e),
            Err(InspectError::Open(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(_) => path_ok = false,
        }
    }
    match refused {
        Some(e) => Outcome::Inspected {
            path,
            result: Err(e),
        },
        None => Outcome::Gone,
    }
}

/// The file's path (for logs) and where to open it; `None` when it is gone.
fn candidates(job: &Job) -> Option<(PathBuf, Vec<Candidate>)> {
    match &job.locate {
        Locate::Path(p) => Some((p.clone(), vec![Candidate::Path(p.clone())])),
        Locate::Exe { tgid } => {
            let exe = PathBuf::from(format!("/proc/{tgid}/exe"));
            let path = in_root(*tgid, &fs::read_link(&exe).ok()?);
            Some((
                path.clone(),
                vec![Candidate::Exact(exe), Candidate::Path(path)],
            ))
        }
        Locate::Mapping { tgid, fd } => {
            let mut out = Vec::new();
            let mut path = None;
            if let Some(fd) = fd {
                let link = PathBuf::from(format!("/proc/{tgid}/fd/{fd}"));
                path = fs::read_link(&link).ok().map(|p| in_root(*tgid, &p));
                out.push(Candidate::Exact(link));
            }
            if let Ok(maps) = fs::read_to_string(format!("/proc/{tgid}/maps"))
                && let Some(m) = maps
                    .lines()
                    .filter_map(exec_mapping)
                    .find(|m| m.id == job.id)
            {
                let p = in_root(*tgid, Path::new(m.path));
                if let Some(name) = map_files_name(m.range) {
                    out.push(Candidate::Exact(PathBuf::from(format!(
                        "/proc/{tgid}/map_files/{name}"
                    ))));
                }
                out.push(Candidate::Path(p.clone()));
                path = Some(p);
            }
            Some((path?, out))
        }
    }
}

/// An executable, file-backed line of /proc/<pid>/maps.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Mapping<'a> {
    pub id: FileId,
    /// `start-end`, as map_files names it.
    pub range: &'a str,
    pub path: &'a str,
}

pub(super) fn exec_mapping(line: &str) -> Option<Mapping<'_>> {
    let mut f = line.split_whitespace();
    let (range, perms, _, dev, ino) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let path = f.next()?;
    if !perms.contains('x') || !path.starts_with('/') || f.next().is_some() {
        return None; // not executable, anonymous, or "(deleted)"
    }
    let (maj, min) = dev.split_once(':')?;
    let dev = libc::makedev(
        u32::from_str_radix(maj, 16).ok()?,
        u32::from_str_radix(min, 16).ok()?,
    );
    Some(Mapping {
        id: (dev, ino.parse().ok()?),
        range,
        path,
    })
}

/// The map_files entry of a maps range: the same hex numbers without maps' zero padding
/// (`00400000-0065a000` is `400000-65a000` there).
fn map_files_name(range: &str) -> Option<String> {
    let (a, b) = range.split_once('-')?;
    let (a, b) = (
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    );
    Some(format!("{a:x}-{b:x}"))
}

/// A path as the process sees it, reachable from here (containers have their own root).
pub(super) fn in_root(tgid: u32, path: &Path) -> PathBuf {
    Path::new(&format!("/proc/{tgid}/root")).join(path.strip_prefix("/").unwrap_or(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn parses_executable_mappings_only() {
        let x = "7f1c5a000000-7f1c5a0a0000 r-xp 00022000 fe:01 1311012                    /usr/lib/x86_64-linux-gnu/libssl.so.3";
        let m = exec_mapping(x).unwrap();
        assert_eq!(m.id, (libc::makedev(0xfe, 1), 1311012));
        assert_eq!(m.range, "7f1c5a000000-7f1c5a0a0000");
        assert_eq!(m.path, "/usr/lib/x86_64-linux-gnu/libssl.so.3");
        let ro = x.replace("r-xp", "r--p");
        assert!(exec_mapping(&ro).is_none());
        assert!(
            exec_mapping("7ffd-7ffe r-xp 00000000 00:00 0                          [vdso]")
                .is_none()
        );
        assert!(exec_mapping(&format!("{x} (deleted)")).is_none());
    }

    #[test]
    fn map_files_names_have_no_padding() {
        assert_eq!(
            map_files_name("00400000-0065a000").as_deref(),
            Some("400000-65a000")
        );
        assert_eq!(
            map_files_name("7f1c5a000000-7f1c5a0a0000").as_deref(),
            Some("7f1c5a000000-7f1c5a0a0000")
        );
        // What the kernel lists is what map_files names: our own mappings, low ones too.
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        for m in maps.lines().filter_map(exec_mapping) {
            let name = map_files_name(m.range).unwrap();
            assert!(
                Path::new(&format!("/proc/self/map_files/{name}")).exists(),
                "{name}"
            );
        }
    }

    fn wait(ins: &Inspector) -> Verdict {
        ins.wait_verdict(Duration::from_secs(30)).expect("verdict")
    }

    #[test]
    fn inspector_finds_our_own_libc_mapping_by_identity() {
        let ins = Inspector::start(Budget::DEFAULT, 4).unwrap();
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        let m = maps
            .lines()
            .filter_map(exec_mapping)
            .find(|m| m.path.contains("libc.so"))
            .expect("libc mapped");
        let id = m.id;
        ins.submit(Job {
            id,
            locate: Locate::Mapping {
                tgid: std::process::id(),
                fd: None,
            },
        })
        .unwrap();
        let v = wait(&ins);
        assert_eq!(v.id, id);
        match v.outcome {
            Outcome::Inspected { result, .. } => assert!(result.unwrap().is_none()),
            o => panic!("{o:?}"),
        }
        // An identity nobody maps.
        ins.submit(Job {
            id: (1, 1),
            locate: Locate::Mapping {
                tgid: std::process::id(),
                fd: None,
            },
        })
        .unwrap();
        assert!(matches!(wait(&ins).outcome, Outcome::Gone));
    }

    #[test]
    fn inspector_refuses_a_fifo_at_the_path_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("lib.so");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let m = fs::metadata(&fifo).unwrap();
        let ins = Inspector::start(Budget::DEFAULT, 4).unwrap();
        ins.submit(Job {
            id: (m.dev(), m.ino()),
            locate: Locate::Path(fifo),
        })
        .unwrap();
        match wait(&ins).outcome {
            Outcome::Inspected { result, .. } => {
                assert_eq!(result.unwrap_err().reason(), "not_regular")
            }
            o => panic!("{o:?}"),
        }
        assert!(ins.stuck(Duration::ZERO).is_none());
    }
}
