//! The allocator setting a CPU training binary makes first thing in `main`.
//!
//! Every candle `backward()` allocates fresh full-size tensors (gradients, their accumulators,
//! every op's output), and a training step frees them again. glibc's `malloc` serves each
//! buffer above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it with
//! `munmap` when freed, and trims freed heap memory back to the kernel: so each step touches
//! its buffers' pages for the first time again and takes a page fault per page, at about 3 GB/s
//! here, which can cost more than the arithmetic. PyTorch's CPU allocator avoids the same cost
//! by caching. [`tune_allocator`] makes glibc keep what a step freed for the next step.
//!
//! The library never changes allocator settings on its own: a training binary opts in.

/// What [`tune_allocator`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllocatorTuning {
    /// glibc's `malloc` now serves every size from its heaps (`M_MMAP_MAX` 0) and keeps up to
    /// 2 GiB of freed memory at the top of the heap (`M_TRIM_THRESHOLD`) for reuse.
    Tuned,
    /// A `MALLOC_MMAP_MAX_`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or
    /// `MALLOC_TOP_PAD_` variable is set: the environment's choice stands, nothing was changed.
    FromEnvironment,
    /// Not glibc (macOS, Windows, musl), or glibc refused the setting: nothing was changed.
    Unchanged,
}

/// The environment variables by which glibc's allocator is tuned from outside the binary.
const GLIBC_VARIABLES: [&str; 4] = [
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
];

/// Makes the process's allocator keep freed memory for reuse, so the buffers of each training
/// step reuse the previous step's pages instead of faulting fresh ones in. Call it first thing
/// in a training binary's `main`, before any tensor is allocated; it affects the whole
/// process, so a library should never call it.
///
/// On Linux with glibc it sets `M_MMAP_MAX` to 0 and `M_TRIM_THRESHOLD` to 2 GiB (unless
/// glibc's `MALLOC_*_` variables are set, which then stand); elsewhere it is a no-op
/// returning [`AllocatorTuning::Unchanged`]. The price is memory: the process keeps its peak
/// heap instead of returning it between steps, as PyTorch's caching allocator does. See
/// BENCHMARKS.md ("The allocator") for the measured effect (a batch-norm training step 2–3x
/// faster, cheap activations 2x faster).
///
/// ```
/// use gradkit::core::AllocatorTuning;
/// // First thing in a training binary's `main`, before the model is built:
/// let tuning = gradkit::core::tune_allocator();
/// if cfg!(all(target_os = "linux", target_env = "gnu")) {
///     assert_ne!(tuning, AllocatorTuning::Unchanged);
/// }
/// ```
pub fn tune_allocator() -> AllocatorTuning {
    if GLIBC_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some())
    {
        return AllocatorTuning::FromEnvironment;
    }
    tune_glibc()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_glibc() -> AllocatorTuning {
    #[allow(
        unsafe_code,
        reason = "mallopt is glibc's documented interface for these settings"
    )]
    // SAFETY: `mallopt` takes two integers and changes only the allocator's parameters; it is
    // thread-safe (it takes each arena's lock), and both values are in its documented ranges.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
    };
    if ok {
        AllocatorTuning::Tuned
    } else {
        AllocatorTuning::Unchanged
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_glibc() -> AllocatorTuning {
    AllocatorTuning::Unchanged
}
