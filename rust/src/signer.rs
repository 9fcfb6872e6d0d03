//! `SignWorker`: Ed25519 signatures made on a native thread, off the event loop.
//!
//! The event loop thread hands a job (its token, a key, one or more messages) to
//! `submit` and goes on; a native thread (`worker.rs`) signs without ever taking the GIL
//! and hands the signatures back through `take` once its queue is empty.  The loop thread
//! may sign a queued job itself when it has nothing else to do (`steal`).  Signatures are
//! RFC 8032 Ed25519 (the same bytes as libsodium's for the same key and message; tested
//! against it).

use std::sync::Arc;

use ed25519_dalek::{Signer, SigningKey};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::worker::Worker;

/// An Ed25519 signing key for a [`SignWorker`] (zeroized when dropped).
#[pyclass(module = "nebula.raft._core", frozen)]
pub struct Ed25519Key {
    key: Arc<SigningKey>,
}

#[pymethods]
impl Ed25519Key {
    #[new]
    fn new(seed: PyBackedBytes) -> PyResult<Self> {
        let seed: [u8; 32] = seed
            .as_ref()
            .try_into()
            .map_err(|_| PyValueError::new_err("an Ed25519 seed is 32 bytes"))?;
        Ok(Self {
            key: Arc::new(SigningKey::from_bytes(&seed)),
        })
    }

    /// The 32-byte public key.
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.key.verifying_key().as_bytes())
    }
}

struct Job {
    token: u64,
    key: Arc<SigningKey>,
    msgs: Vec<Vec<u8>>,
}

fn sign(job: Job) -> (u64, Vec<[u8; 64]>) {
    let sigs = job
        .msgs
        .iter()
        .map(|m| job.key.sign(m).to_bytes())
        .collect();
    (job.token, sigs)
}

/// One native signing thread; results are announced on the eventfd given.
#[pyclass(module = "nebula.raft._core")]
pub struct SignWorker {
    worker: Worker<Job, (u64, Vec<[u8; 64]>)>,
}

#[pymethods]
impl SignWorker {
    #[new]
    fn new(eventfd: i32) -> PyResult<Self> {
        let worker = Worker::start("nebula-sign", eventfd, sign).map_err(|e| {
            PyRuntimeError::new_err(format!("cannot start the signing thread: {e}"))
        })?;
        Ok(Self { worker })
    }

    /// Queue ``msgs`` to be signed with ``key``; the result comes back from ``take``
    /// under ``token``.
    fn submit(&self, token: u64, key: &Ed25519Key, msgs: Vec<PyBackedBytes>) -> PyResult<()> {
        let job = Job {
            token,
            key: key.key.clone(),
            msgs: msgs.iter().map(|m| m.to_vec()).collect(),
        };
        if self.worker.submit(job) {
            Ok(())
        } else {
            Err(PyRuntimeError::new_err("the signing worker is closed"))
        }
    }

    /// Sign the most recently queued job on the calling thread (the event loop's; the
    /// GIL is released meanwhile) if the signing thread is busy with another: False when
    /// it is not, or nothing is queued.  Its signatures come back from ``take`` with the
    /// thread's.
    fn steal(&self, py: Python<'_>) -> bool {
        py.allow_threads(|| self.worker.steal())
    }

    /// ``(jobs queued, jobs being signed)`` now.
    #[getter]
    fn load(&self) -> (usize, usize) {
        self.worker.load()
    }

    /// The finished jobs: a list of ``(token, [signature, ...])``.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for (token, sigs) in self.worker.take() {
            let sigs = PyList::new(py, sigs.iter().map(|s| PyBytes::new(py, s)))?;
            out.append(PyTuple::new(
                py,
                [token.into_pyobject(py)?.into_any(), sigs.into_any()],
            )?)?;
        }
        Ok(out)
    }

    /// The signing thread runs (False once closed, or if it ever stopped).
    #[getter]
    fn alive(&self) -> bool {
        self.worker.alive()
    }

    /// Stop the thread (jobs not yet signed are dropped) and wait for it.
    fn close(&mut self, py: Python<'_>) {
        self.worker.close(py);
    }
}
