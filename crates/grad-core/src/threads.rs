//! The thread-count setting a CPU training binary makes first thing in `main`.
//!
//! candle's CPU matmul asks `candle_core::utils::get_num_threads()` how many threads to use on
//! every call. Unless `RAYON_NUM_THREADS` is set, that function counts the physical cores
//! again, and on Linux without per-core capacities (most x86 machines) this parses
//! `/proc/cpuinfo` (`num_cpus::get_physical`) on each call. Here that read takes about 40 µs,
//! and the file grows with the core count. On the vanishing demo's network it was 70% of a
//! training step: one forward and backward took 2.8–3.0 ms, and 0.89 ms with the variable set.
//! [`tune_threads`] sets the variable to the count candle computes, once, so every later call
//! reads it from the environment and candle's choice of threads stays the same.
//!
//! The library never changes the environment on its own: a training binary opts in.

/// What [`tune_threads`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ThreadTuning {
    /// `RAYON_NUM_THREADS` is now `threads`, the count candle computed. rayon's global pool
    /// was built with the size it would have had without the variable.
    Tuned {
        /// The thread count candle computed and now reads from the environment.
        threads: usize,
    },
    /// `RAYON_NUM_THREADS` was already set: candle reads it, so nothing was changed.
    FromEnvironment,
    /// Other threads were running, so the environment could not be changed safely: nothing was
    /// changed (call it before anything spawns a thread).
    NotSingleThreaded,
    /// Not Linux, where candle's count does not read a file each time: nothing was changed.
    Unchanged,
}

/// Makes candle's CPU ops stop recounting the cores on every matmul. Call it first thing in a
/// training binary's `main`, before any thread is spawned: it sets `RAYON_NUM_THREADS` for the
/// whole process, so a library should never call it.
///
/// On Linux, with `RAYON_NUM_THREADS` unset and no other thread running (read from
/// `/proc/self/status`), it sets the variable to the count candle computes, the physical cores
/// (or `CANDLE_CPU_MASK`'s), and builds rayon's global pool with the size rayon would have
/// used without the variable (`std::thread::available_parallelism`). candle's ops and gradkit's
/// kernels then run on as many threads as before. Elsewhere, or when the variable is already
/// set, it changes nothing. See BENCHMARKS.md ("The thread count") for the measured effect.
///
/// ```
/// use gradkit::core::ThreadTuning;
/// // First thing in a training binary's `main`, before the model is built:
/// if let ThreadTuning::Tuned { threads } = gradkit::core::tune_threads() {
///     println!("candle's ops run on {threads} threads");
/// }
/// ```
pub fn tune_threads() -> ThreadTuning {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return ThreadTuning::FromEnvironment;
    }
    tune_linux()
}

#[cfg(target_os = "linux")]
fn tune_linux() -> ThreadTuning {
    if threads_in_process() != Some(1) {
        return ThreadTuning::NotSingleThreaded;
    }
    let rayon_default = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let threads = candle_core::utils::get_num_threads();
    #[allow(
        unsafe_code,
        reason = "setting an environment variable is unsafe in edition 2024"
    )]
    // SAFETY: the process runs one thread (this one, read just above), so no other thread can
    // read or write the environment while it changes.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // The variable would also size rayon's global pool: give it the size it had without it.
    // An error means the pool already exists, with that size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon_default)
        .build_global();
    ThreadTuning::Tuned { threads }
}

#[cfg(not(target_os = "linux"))]
fn tune_linux() -> ThreadTuning {
    ThreadTuning::Unchanged
}

/// The process's thread count from `/proc/self/status` (`None` when it cannot be read).
#[cfg(target_os = "linux")]
fn threads_in_process() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}
