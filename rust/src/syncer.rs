//! `SyncWorker`: a leader's `fdatasync` on a native thread, off the event loop.
//!
//! The event loop hands a job (its token, a file descriptor) to `submit` and goes on
//! (sending the Ready's appends to the followers); a native thread calls `fdatasync`
//! without ever taking the GIL, so the sync starts as soon as the thread has a core,
//! not when the loop next lets go of the GIL.  Each outcome (0, or the `errno` of a
//! failed sync) is kept for `take`, and an eventfd the loop watches is written once
//! until the next `take` (which clears the "written" flag under the same lock the
//! outcomes are pushed under: an outcome pushed after a take writes again).
//!
//! The descriptor must stay open until its outcome is taken; `close` waits for the
//! sync in progress, so the caller may close the file once `close` has returned.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

#[derive(Default)]
struct State {
    jobs: VecDeque<(u64, i32)>,
    done: Vec<(u64, i32)>,
    /// The eventfd was written since the last `take`.
    notified: bool,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    efd: i32,
}

fn run(shared: Arc<Shared>) {
    loop {
        let (token, fd) = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if st.stop {
                    return;
                }
                if let Some(job) = st.jobs.pop_front() {
                    break job;
                }
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        // SAFETY: a plain syscall on a descriptor the caller keeps open (module doc).
        let rc = unsafe { libc::fdatasync(fd) };
        let err = if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
        };
        let wake = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.done.push((token, err));
            let wake = !st.notified;
            st.notified = true;
            wake
        };
        if wake {
            crate::signer::notify(shared.efd);
        }
    }
}

/// One native thread that runs `fdatasync`; outcomes are announced on the eventfd given.
#[pyclass(module = "nebula.raft._core")]
pub struct SyncWorker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[pymethods]
impl SyncWorker {
    #[new]
    fn new(eventfd: i32) -> PyResult<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            efd: eventfd,
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nebula-sync".into())
            .spawn(move || run(s2))
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the sync thread: {e}")))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Queue an ``fdatasync(fd)``; its outcome comes back from ``take`` under ``token``.
    fn submit(&self, token: u64, fd: i32) -> PyResult<()> {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.stop || self.thread.is_none() {
            return Err(PyRuntimeError::new_err("the sync worker is closed"));
        }
        st.jobs.push_back((token, fd));
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The finished syncs: a list of ``(token, errno)``, errno 0 for a sync that succeeded.
    fn take(&self) -> Vec<(u64, i32)> {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.notified = false;
        std::mem::take(&mut st.done)
    }

    /// The sync thread runs (False once closed, or if it ever stopped).
    #[getter]
    fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stop the thread once the sync in progress (if any) returns, drop the queued ones,
    /// and wait for it.
    fn close(&mut self, py: Python<'_>) {
        self.halt();
        if let Some(t) = self.thread.take() {
            py.allow_threads(|| {
                let _ = t.join();
            });
        }
    }
}

impl SyncWorker {
    fn halt(&self) {
        {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.stop = true;
            st.jobs.clear();
        }
        self.shared.wake.notify_all();
    }
}

impl Drop for SyncWorker {
    fn drop(&mut self) {
        self.halt();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
