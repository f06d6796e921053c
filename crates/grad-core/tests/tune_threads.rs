//! `tune_threads` on a process's only thread (this test has no libtest harness, so `main` is
//! that thread): the variable is set to candle's own count, rayon's pool keeps its default size,
//! and a second call leaves the environment as the first set it.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]

use grad_core::{ThreadTuning, tune_threads};

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        assert_eq!(tune_threads(), ThreadTuning::FromEnvironment);
        println!("tune_threads: RAYON_NUM_THREADS was set outside, nothing to check");
        return;
    }
    let tuning = tune_threads();
    if !cfg!(target_os = "linux") {
        assert_eq!(tuning, ThreadTuning::Unchanged);
        return;
    }
    let ThreadTuning::Tuned { threads } = tuning else {
        panic!("expected Tuned on Linux's only thread, got {tuning:?}");
    };
    assert!(threads >= 1);
    assert_eq!(
        std::env::var("RAYON_NUM_THREADS").unwrap(),
        threads.to_string()
    );
    // candle now reads the count it computed from the environment.
    assert_eq!(candle_core::utils::get_num_threads(), threads);
    // rayon's pool has the size it would have had without the variable.
    let default = std::thread::available_parallelism().unwrap().get();
    assert_eq!(rayon::current_num_threads(), default);
    // rayon's workers now run: a second call changes nothing.
    assert_eq!(tune_threads(), ThreadTuning::FromEnvironment);
    println!("tune_threads: candle {threads} threads, rayon {default}");
}
