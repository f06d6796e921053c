//! `monitor_overhead/mlp10x512`, measured in alternating blocks: 6 plain training steps, then 6
//! observed ones (three probes and `GradMonitor::observe`), and so on, 40 pairs of blocks after
//! a warm-up pair. The first 2 steps of each block are dropped (the switch itself disturbs the
//! allocator and caches, which a loop that observes at a fixed rate does not see), and each pair
//! gives the ratio of its blocks' medians. Adjacent blocks see the same load on a shared
//! machine, so the median ratio is steadier than two criterion timings taken seconds apart.
//!
//! `cargo bench --bench monitor_paired`

#![allow(clippy::expect_used, reason = "a bench with broken data should stop")]

mod common;

use std::time::Instant;

use common::mlp::Mlp;

const BLOCK: usize = 6;
const SETTLE: usize = 2;

/// The median time of the settled steps of one block.
fn block(net: &mut Mlp, observed: bool) -> f64 {
    let mut times: Vec<f64> = (0..BLOCK)
        .map(|_| {
            let start = Instant::now();
            net.step(observed);
            start.elapsed().as_secs_f64()
        })
        .skip(SETTLE)
        .collect();
    times.sort_by(f64::total_cmp);
    median(&times)
}

fn median(sorted: &[f64]) -> f64 {
    quantile(sorted, 0.5)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    grad_core::tune_allocator();
    grad_core::tune_threads();
    let pairs = 40;
    let mut net = Mlp::new();
    block(&mut net, false);
    block(&mut net, true);
    let (mut ratios, mut plain, mut observed) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        // Alternate which block comes first, so neither always follows the other.
        let (p, o) = if i % 2 == 0 {
            let p = block(&mut net, false);
            (p, block(&mut net, true))
        } else {
            let o = block(&mut net, true);
            (block(&mut net, false), o)
        };
        ratios.push(o / p);
        plain.push(p);
        observed.push(o);
    }
    for v in [&mut ratios, &mut plain, &mut observed] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "monitor_overhead/mlp10x512 in {pairs} block pairs: median step {:.2} ms plain, {:.2} ms \
         observed; overhead median {:+.1}% (quartiles {:+.1}% to {:+.1}%)",
        median(&plain) * 1e3,
        median(&observed) * 1e3,
        (median(&ratios) - 1.0) * 100.0,
        (quantile(&ratios, 0.25) - 1.0) * 100.0,
        (quantile(&ratios, 0.75) - 1.0) * 100.0,
    );
}
