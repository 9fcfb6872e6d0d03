//! `SignWorker`: Ed25519 signatures made on a native thread, off the event loop.
//!
//! The event loop thread hands a job (its token, a key, one or more messages) to
//! `submit` and goes on; a native thread signs without ever taking the GIL and
//! makes the results available to `take`, writing to an eventfd the loop watches once
//! its queue is empty (or `BATCH` results wait).  The loop reads the eventfd, then
//! `take`s, which clears the "written" flag under the same lock that results are pushed
//! under: a result pushed after the take writes again, one pushed before it is taken.
//! Signatures are RFC 8032 Ed25519 (the same bytes as libsodium's for the same key and
//! message; tested against it).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use ed25519_dalek::{Signer, SigningKey};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyList, PyTuple};

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

/// Results handed back at once at most, when jobs keep coming.
const BATCH: usize = 32;

struct Job {
    token: u64,
    key: Arc<SigningKey>,
    msgs: Vec<Vec<u8>>,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    done: Vec<(u64, Vec<[u8; 64]>)>,
    /// The eventfd was written since the last `take`.
    notified: bool,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    efd: i32,
}

pub(crate) fn notify(efd: i32) {
    let one: u64 = 1;
    // An eventfd write only fails when its counter would overflow (it is read at every
    // wake-up) or the fd is closed (the worker is being shut down): nothing to do then.
    unsafe {
        libc::write(efd, &one as *const u64 as *const libc::c_void, 8);
    }
}

fn run(shared: Arc<Shared>) {
    loop {
        let job = {
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
        let sigs: Vec<[u8; 64]> = job
            .msgs
            .iter()
            .map(|m| job.key.sign(m).to_bytes())
            .collect();
        let wake = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.done.push((job.token, sigs));
            // The results go back together: once the queue is empty (every job the loop
            // handed over in one pass is signed, so their decisions share one proposal),
            // or when many are waiting.
            let wake = !st.notified && (st.jobs.is_empty() || st.done.len() >= BATCH);
            st.notified |= wake;
            wake
        };
        if wake {
            notify(shared.efd);
        }
    }
}

/// One native signing thread; results are announced on the eventfd given.
#[pyclass(module = "nebula.raft._core")]
pub struct SignWorker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[pymethods]
impl SignWorker {
    #[new]
    fn new(eventfd: i32) -> PyResult<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            efd: eventfd,
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nebula-sign".into())
            .spawn(move || run(s2))
            .map_err(|e| {
                PyRuntimeError::new_err(format!("cannot start the signing thread: {e}"))
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Queue ``msgs`` to be signed with ``key``; the result comes back from ``take``
    /// under ``token``.
    fn submit(&self, token: u64, key: &Ed25519Key, msgs: Vec<PyBackedBytes>) -> PyResult<()> {
        let job = Job {
            token,
            key: key.key.clone(),
            msgs: msgs.iter().map(|m| m.to_vec()).collect(),
        };
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.stop || self.thread.is_none() {
            return Err(PyRuntimeError::new_err("the signing worker is closed"));
        }
        st.jobs.push_back(job);
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The finished jobs: a list of ``(token, [signature, ...])``.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let done = {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.notified = false;
            std::mem::take(&mut st.done)
        };
        let out = PyList::empty(py);
        for (token, sigs) in done {
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
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stop the thread (jobs not yet signed are dropped) and wait for it.
    fn close(&mut self, py: Python<'_>) {
        self.halt();
        if let Some(t) = self.thread.take() {
            py.allow_threads(|| {
                let _ = t.join();
            });
        }
    }
}

impl SignWorker {
    /// Tell the thread to stop after the job it signs now; drop the queued ones.
    fn halt(&self) {
        {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.stop = true;
            st.jobs.clear();
        }
        self.shared.wake.notify_all();
    }
}

impl Drop for SignWorker {
    fn drop(&mut self) {
        self.halt();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
