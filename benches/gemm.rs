//! GEMM micro-benchmark: the prefill matrix products of a gemma-2-2b layer at every SIMD level this CPU
//! has, against the measured f32 FMA peak of that level (`cargo bench --bench gemm`).
//!
//! Environment: N (activation rows, default 128), THREADS (default: all cores), REPEAT (default 5).
//! Prints GFLOP/s (2 per multiply-add) for each shape and level, and the fraction of the level's peak:
//! the peak is measured by a loop of independent FMAs (12 accumulators) on every thread at once.

use std::time::Instant;

use gemma_merge::format::FloatType;
use gemma_merge::model::gemm::{matmul_into, Precision};
use gemma_merge::model::Weight;
use gemma_merge::simd::{self, Level};
use rayon::prelude::*;

/// CPU seconds used so far by every thread of this process (Linux `/proc/self/task/*/schedstat`), so
/// that rates stay meaningful on a machine shared with other work; `None` elsewhere.
fn cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let s = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// Runs `f` and returns its duration in seconds on the cores: CPU seconds / threads where the CPU
/// time is known (immune to other processes' load), else wall seconds.
fn timed(threads: usize, f: impl FnOnce()) -> (f64, f64) {
    let (c0, t) = (cpu_seconds(), Instant::now());
    f();
    let wall = t.elapsed().as_secs_f64();
    let cpu = match (c0, cpu_seconds()) {
        (Some(a), Some(b)) => (b - a) / threads as f64,
        _ => wall,
    };
    (cpu, wall)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(iters: usize) -> f32 {
        let mut a = [_mm512_set1_ps(1.0); 12];
        let (b, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm512_fmadd_ps(*v, b, c);
            }
        }
        a.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(iters: usize) -> f32 {
        let mut a = [_mm256_set1_ps(1.0); 12];
        let (b, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm256_fmadd_ps(*v, b, c);
            }
        }
        let mut s = [0f32; 8];
        let mut t = _mm256_setzero_ps();
        for v in a {
            t = _mm256_add_ps(t, v);
        }
        _mm256_storeu_ps(s.as_mut_ptr(), t);
        s.iter().sum()
    }
}

/// Peak GFLOP/s of `level` on every rayon thread at once.
fn peak_gflops(level: Level) -> f64 {
    let threads = rayon::current_num_threads();
    let iters = 20_000_000;
    let run = || {
        timed(threads, || {
            let s: f32 = (0..threads)
                .into_par_iter()
                .map(|_| match level {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `level` is one of simd::available().
                    Level::Avx512 => unsafe { peak::avx512(iters) },
                    #[cfg(target_arch = "x86_64")]
                    Level::Avx2 => unsafe { peak::avx2(iters) },
                    _ => 0.0,
                })
                .sum();
            std::hint::black_box(s);
        })
        .0
    };
    let lanes = match level {
        Level::Avx512 => 16.0,
        _ => 8.0,
    };
    let best = (0..3).map(|_| run()).fold(f64::INFINITY, f64::min);
    (threads * iters) as f64 * 12.0 * lanes * 2.0 / best / 1e9
}

fn main() {
    let n = env("N", 128);
    let repeat = env("REPEAT", 5);
    if let Some(t) = std::env::var("THREADS").ok().and_then(|v| v.parse().ok()) {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .unwrap();
    }
    let shapes = [
        ("q/o 2304x2048", 2048, 2304),
        ("gate/up 9216x2304", 9216, 2304),
        ("down 2304x9216", 2304, 9216),
    ];
    println!(
        "rates per CPU-second of this process's threads (other load excluded) where /proc is there"
    );
    println!(
        "{} threads, n = {n}, CPU level {}, AVX512-BF16: {}",
        rayon::current_num_threads(),
        simd::detected(),
        simd::cpu_has_bf16_dot()
    );
    let mut levels: Vec<(Level, Precision)> = simd::available()
        .into_iter()
        .map(|l| (l, Precision::Exact))
        .collect();
    if simd::cpu_has_bf16_dot() {
        levels.push((Level::Avx512, Precision::Bf16));
    }
    let peaks: Vec<(Level, f64)> = simd::available()
        .into_iter()
        .filter(|&l| l != Level::Portable)
        .map(|l| (l, peak_gflops(l)))
        .collect();
    for (l, p) in &peaks {
        println!("peak f32 FMA {l}: {p:.1} GFLOP/s");
    }
    for (name, m, k) in shapes {
        let wv: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1999) as f32 / 1999.0 - 0.5)
            .collect();
        let w = Weight::from_values(FloatType::BF16, vec![m, k], &wv).unwrap();
        let x: Vec<f32> = (0..n * k)
            .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let mut y = vec![0f32; n * m];
        for &(level, precision) in &levels {
            matmul_into(level, precision, &x, n, &w, &mut y);
            let mut times: Vec<f64> = (0..repeat)
                .map(|_| {
                    timed(rayon::current_num_threads(), || {
                        matmul_into(level, precision, &x, n, &w, &mut y)
                    })
                    .0
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let gf = 2.0 * (n * m * k) as f64 / times[times.len() / 2] / 1e9;
            let frac = peaks
                .iter()
                .find(|(l, _)| *l == level)
                .map(|(_, p)| format!("{:.0}% of {level} peak", 100.0 * gf / p))
                .unwrap_or_default();
            let mode = if precision == Precision::Bf16 {
                "bf16"
            } else {
                "exact"
            };
            println!("{name:<20} {level:<8} {mode:<5} {gf:7.1} GFLOP/s  {frac}");
        }
    }
}
