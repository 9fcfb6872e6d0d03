//! A native worker thread serving one event loop: jobs in, results out, an eventfd between.
//!
//! The loop thread hands a job to `submit` and goes on; the thread runs it without ever
//! taking the GIL and keeps the result for `take`.  It writes the eventfd the loop watches
//! once its queue is empty and no job is running (or `BATCH` results wait), at most once
//! until the next `take`: `take` clears the "written" flag under the same lock the results
//! are pushed under, so a result pushed after a take writes again and one pushed before it
//! is taken with it.  While the thread is busy, the loop thread may run a queued job
//! itself (`steal`, when it has nothing else to do); its result joins the same hand-back.
//! Used by the signing thread (`signer.rs`) and the Raft leader's sync thread
//! (`syncer.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use pyo3::prelude::*;

/// Results handed back at once at most, when jobs keep coming.
const BATCH: usize = 32;

struct State<J, R> {
    jobs: VecDeque<J>,
    done: Vec<R>,
    /// The eventfd was written since the last `take`.
    notified: bool,
    /// The thread waits on the condvar (set and cleared under the lock): `submit` wakes
    /// it only then.  A notify costs a futex syscall even with no one waiting, and the
    /// loop hands over a job per request while the thread is mostly busy.
    sleeping: bool,
    /// Jobs taken off the queue and not finished (by the thread, or by `steal`).
    running: usize,
    stop: bool,
}

struct Shared<J, R> {
    state: Mutex<State<J, R>>,
    wake: Condvar,
    efd: i32,
}

impl<J, R> Shared<J, R> {
    fn lock(&self) -> MutexGuard<'_, State<J, R>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A job taken off the queue ended (with its result, or none if it panicked): write
    /// the eventfd if the results should go back now.
    fn finished(&self, result: Option<R>) {
        let wake = {
            let mut st = self.lock();
            st.running -= 1;
            if let Some(r) = result {
                st.done.push(r);
            }
            // The results go back together: once nothing is queued or running (every
            // job the loop handed over in one pass is done, so, for signatures, their
            // decisions share one proposal), or when many are waiting.
            let wake = !st.notified
                && !st.done.is_empty()
                && ((st.jobs.is_empty() && st.running == 0) || st.done.len() >= BATCH);
            st.notified |= wake;
            wake
        };
        if wake {
            notify(self.efd);
        }
    }
}

fn notify(efd: i32) {
    let one: u64 = 1;
    // An eventfd write only fails when its counter would overflow (it is read at every
    // wake-up) or the fd is closed (the worker is being shut down): nothing to do then.
    unsafe {
        libc::write(efd, &one as *const u64 as *const libc::c_void, 8);
    }
}

/// The thread and its queues; `run` is what the thread does with each job.
pub struct Worker<J, R> {
    shared: Arc<Shared<J, R>>,
    thread: Option<JoinHandle<()>>,
    run: Arc<dyn Fn(J) -> R + Send + Sync>,
}

impl<J: Send + 'static, R: Send + 'static> Worker<J, R> {
    pub fn start(
        name: &str,
        eventfd: i32,
        run: impl Fn(J) -> R + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let run: Arc<dyn Fn(J) -> R + Send + Sync> = Arc::new(run);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                done: Vec::new(),
                notified: false,
                sleeping: false,
                running: 0,
                stop: false,
            }),
            wake: Condvar::new(),
            efd: eventfd,
        });
        let (s2, r2) = (shared.clone(), run.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || serve(&s2, &*r2))?;
        Ok(Self {
            shared,
            thread: Some(thread),
            run,
        })
    }
}

impl<J, R> Worker<J, R> {
    /// Queue a job; false (nothing queued) once the worker is closed.
    pub fn submit(&self, job: J) -> bool {
        let mut st = self.shared.lock();
        if st.stop || self.thread.is_none() {
            return false;
        }
        st.jobs.push_back(job);
        let sleeping = st.sleeping;
        drop(st);
        if sleeping {
            self.shared.wake.notify_one();
        }
        true
    }

    /// Run the most recently queued job on the calling thread, if the worker's thread is
    /// busy with another one: false (nothing run) when it is not, or nothing is queued.
    /// The result is handed back with the thread's, by the same rule.  For a loop thread
    /// with nothing else to do: the thread and the loop then work through the queue from
    /// both ends.  A job that panics here leaves no result (its caller's deadline ends
    /// it) and the panic goes on to the caller.
    pub fn steal(&self) -> bool {
        let job = {
            let mut st = self.shared.lock();
            if st.stop || st.running == 0 {
                return false;
            }
            match st.jobs.pop_back() {
                Some(job) => {
                    st.running += 1;
                    job
                }
                None => return false,
            }
        };
        let run = &self.run;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(job))) {
            Ok(result) => {
                self.shared.finished(Some(result));
                true
            }
            Err(panic) => {
                self.shared.finished(None);
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// (jobs queued, jobs being run) now.
    pub fn load(&self) -> (usize, usize) {
        let st = self.shared.lock();
        (st.jobs.len(), st.running)
    }

    /// The results finished since the last `take`, in the order they finished.
    pub fn take(&self) -> Vec<R> {
        let mut st = self.shared.lock();
        st.notified = false;
        std::mem::take(&mut st.done)
    }

    /// The thread runs (false once closed, or if it ever stopped).
    pub fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stop the thread once the job in progress (if any) is done, drop the queued ones,
    /// and wait for it (without the GIL).
    pub fn close(&mut self, py: Python<'_>) {
        self.halt();
        if let Some(t) = self.thread.take() {
            py.allow_threads(|| {
                let _ = t.join();
            });
        }
    }

    fn halt(&self) {
        {
            let mut st = self.shared.lock();
            st.stop = true;
            st.jobs.clear();
        }
        self.shared.wake.notify_all();
    }
}

impl<J, R> Drop for Worker<J, R> {
    fn drop(&mut self) {
        self.halt();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve<J, R>(shared: &Shared<J, R>, run: &dyn Fn(J) -> R) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if st.stop {
                    return;
                }
                if let Some(job) = st.jobs.pop_front() {
                    st.running += 1;
                    break job;
                }
                st.sleeping = true;
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                st.sleeping = false;
            }
        };
        let result = run(job);
        shared.finished(Some(result));
    }
}
