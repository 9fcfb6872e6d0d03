//! `SyncWorker`: a leader's `fdatasync` on a native thread, off the event loop.
//!
//! The event loop hands a job (its token, a file descriptor) to `submit` and goes on
//! (sending the Ready's appends to the followers); a native thread (`worker.rs`) calls
//! `fdatasync` without ever taking the GIL, so the sync starts as soon as the thread has
//! a core, not when the loop next lets go of the GIL.  Each outcome (0, or the `errno`
//! of a failed sync) comes back through `take`.
//!
//! The descriptor must stay open until its outcome is taken; `close` waits for the
//! sync in progress, so the caller may close the file once `close` has returned.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::worker::Worker;

fn sync((token, fd): (u64, i32)) -> (u64, i32) {
    // SAFETY: a plain syscall on a descriptor the caller keeps open (module doc).
    let rc = unsafe { libc::fdatasync(fd) };
    let err = if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    (token, err)
}

/// One native thread that runs `fdatasync`; outcomes are announced on the eventfd given.
#[pyclass(module = "nebula.raft._core")]
pub struct SyncWorker {
    worker: Worker<(u64, i32), (u64, i32)>,
}

#[pymethods]
impl SyncWorker {
    #[new]
    fn new(eventfd: i32) -> PyResult<Self> {
        let worker = Worker::start("nebula-sync", eventfd, sync)
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the sync thread: {e}")))?;
        Ok(Self { worker })
    }

    /// Queue an ``fdatasync(fd)``; its outcome comes back from ``take`` under ``token``.
    fn submit(&self, token: u64, fd: i32) -> PyResult<()> {
        if self.worker.submit((token, fd)) {
            Ok(())
        } else {
            Err(PyRuntimeError::new_err("the sync worker is closed"))
        }
    }

    /// The finished syncs: a list of ``(token, errno)``, errno 0 for a sync that succeeded.
    fn take(&self) -> Vec<(u64, i32)> {
        self.worker.take()
    }

    /// The sync thread runs (False once closed, or if it ever stopped).
    #[getter]
    fn alive(&self) -> bool {
        self.worker.alive()
    }

    /// Stop the thread once the sync in progress (if any) returns, drop the queued ones,
    /// and wait for it.
    fn close(&mut self, py: Python<'_>) {
        self.worker.close(py);
    }
}
