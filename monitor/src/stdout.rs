//! Stdout for request records and alerts. Live, lines go through a bounded queue to a
//! writer thread: a reader that does not keep up (or never reads) makes lines drop, counted,
//! instead of stopping the capture loop in `write`. A replay writes directly and waits.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::warn;

/// Bytes waiting for the writer thread at most; past it whole batches are dropped.
pub const MAX_QUEUED: usize = 8 * 1024 * 1024;

struct Queue {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    queued: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
    warned: bool,
}

pub struct Stdout {
    /// Lines written since the last flush.
    batch: Vec<u8>,
    queue: Option<Queue>,
    /// Lines dropped because the reader was too slow.
    pub dropped: u64,
}

impl Stdout {
    /// `queued`: through the writer thread, dropping when full (live); else blocking (replay).
    pub fn new(queued: bool) -> Self {
        Self::with_writer(queued, std::io::stdout)
    }

    fn with_writer<W: Write + 'static>(queued: bool, out: fn() -> W) -> Self {
        let queue = queued.then(|| {
            let (tx, rx) = mpsc::channel::<Vec<u8>>();
            let queued = Arc::new(AtomicUsize::new(0));
            let q = queued.clone();
            let thread = std::thread::Builder::new()
                .name("stdout".into())
                .spawn(move || {
                    let mut out = out();
                    for b in rx {
                        // A closed stdout (EPIPE): nothing more can be printed; keep
                        // draining so that the queue's count stays right.
                        let _ = out.write_all(&b).and_then(|()| out.flush());
                        q.fetch_sub(b.len(), Ordering::Relaxed);
                    }
                })
                .expect("spawning the stdout thread");
            Queue {
                tx: Some(tx),
                queued,
                thread: Some(thread),
                warned: false,
            }
        });
        Stdout {
            batch: Vec::new(),
            queue,
            dropped: 0,
        }
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |q| q.queued.load(Ordering::Relaxed))
    }

    /// Hands the lines written so far to stdout (or drops them, counted, when the queue is
    /// full).
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let Some(q) = self.queue.as_mut() else {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&self.batch).and_then(|()| out.flush());
            self.batch.clear();
            return;
        };
        let len = self.batch.len();
        if q.queued.load(Ordering::Relaxed) + len > MAX_QUEUED {
            let lines = self.batch.iter().filter(|&&b| b == b'\n').count() as u64;
            self.dropped += lines;
            if !std::mem::replace(&mut q.warned, true) {
                warn!(
                    queued = q.queued.load(Ordering::Relaxed),
                    "stdout is not read fast enough: records and alerts printed there are dropped (counted in monitor_stdout_dropped_lines_total); alerts still go to the alerts file and webhook"
                );
            }
            self.batch.clear();
            return;
        }
        q.warned = false;
        q.queued.fetch_add(len, Ordering::Relaxed);
        let b = std::mem::replace(&mut self.batch, Vec::with_capacity(len));
        if let Some(tx) = &q.tx {
            let _ = tx.send(b);
        }
    }

    /// Flushes and waits up to `timeout` for the writer; lines still queued after it are
    /// counted as dropped (a stdout nobody reads must not keep the daemon from exiting).
    pub fn finish(&mut self, timeout: Duration) {
        self.flush();
        let Some(q) = self.queue.as_mut() else {
            return;
        };
        if q.tx.take().is_none() {
            return;
        }
        let deadline = Instant::now() + timeout;
        while q.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            if Instant::now() >= deadline {
                warn!(
                    bytes = q.queued.load(Ordering::Relaxed),
                    "stdout not read: output still queued is dropped"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(t) = q.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Stdout {
    // At exit, after the last records and alerts were written.
    fn drop(&mut self) {
        self.finish(Duration::from_secs(2));
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.batch.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Stdout::flush(self);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stdout nobody reads: every write blocks for good.
    struct Stuck;
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            loop {
                std::thread::park();
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reader_that_never_reads_drops_lines_instead_of_blocking() {
        let mut out = Stdout::with_writer(true, || Stuck);
        let line = vec![b'x'; 1023];
        let start = Instant::now();
        let n = 3 * MAX_QUEUED / 1024;
        for _ in 0..n {
            out.write_all(&line).unwrap();
            out.write_all(b"\n").unwrap();
            Stdout::flush(&mut out);
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        // What fits in the queue waits (one batch may be in the writer's hands), the rest is
        // counted.
        assert!(out.queued() <= MAX_QUEUED);
        assert!(
            out.dropped >= (n - MAX_QUEUED / 1024 - 1) as u64,
            "{}",
            out.dropped
        );
        let t = Instant::now();
        out.finish(Duration::from_millis(200));
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
