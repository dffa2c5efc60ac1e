//! Which vector instructions the numeric kernels use: chosen once per process at run time.
//!
//! The widest level the CPU supports is used, unless the environment variable `GEMMA_MERGE_SIMD`
//! (read once) asks for a narrower one: `avx512`, `avx2` or `portable`. A request wider than the CPU
//! supports falls back to what it has; an unknown value is reported once on stderr and ignored. Every
//! kernel also has an entry point taking an explicit [`Level`], so tests run each path on any machine.

use std::sync::OnceLock;

/// An instruction-set level, ordered from narrowest to widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Plain Rust (the compiler may still vectorize it for the baseline target).
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX-512 F/BW/VL/DQ on top of [`Level::Avx2`].
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" | "none" => Some(Self::Portable),
            "avx2" => Some(Self::Avx2),
            "avx512" | "avx-512" => Some(Self::Avx512),
            _ => None,
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The widest level this CPU supports (not capped by the environment).
pub fn detected() -> Level {
    static DETECTED: OnceLock<Level> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let avx512 = avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq");
    if avx512 {
        Level::Avx512
    } else if avx2 {
        Level::Avx2
    } else {
        Level::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Portable
}

/// The level the kernels use: [`detected`], capped by `GEMMA_MERGE_SIMD`.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cpu = detected();
        match std::env::var("GEMMA_MERGE_SIMD") {
            Ok(v) if !v.is_empty() => match Level::parse(&v) {
                Some(want) => want.min(cpu),
                None => {
                    eprintln!(
                        "warning: GEMMA_MERGE_SIMD={v:?} is not one of avx512, avx2, portable; using {cpu}"
                    );
                    cpu
                }
            },
            _ => cpu,
        }
    })
}

/// Every level this CPU can run, narrowest first (for tests and benchmarks).
pub fn available() -> Vec<Level> {
    [Level::Portable, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|&l| l <= detected())
        .collect()
}

/// Whether the CPU has the AVX512-BF16 dot product (`vdpbf16ps`) and the selected level is AVX-512.
pub fn has_bf16_dot() -> bool {
    level() == Level::Avx512 && cpu_has_bf16_dot()
}

/// Whether the CPU has AVX512-BF16 (regardless of `GEMMA_MERGE_SIMD`).
pub fn cpu_has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        detected() == Level::Avx512 && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `fn NAME(args) [-> T] { body }` compiled three times: for AVX-512, for AVX2 + FMA + F16C (each with
/// `#[target_feature]`, so the body's loops vectorise to that width) and portably; `NAME(...)` runs at
/// [`level`], `NAME::at(level, ...)` at an explicit level (at most [`detected`]).
macro_rules! leveled {
    ($(#[$doc:meta])* $vis:vis fn $name:ident ($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        #[allow(dead_code)] // some are used by the tests only
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $name::at($crate::simd::level(), $($arg),*)
        }

        #[allow(dead_code)]
        pub(crate) mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }

            /// At an explicit level (at most `simd::detected()`).
            pub(crate) fn at(level: $crate::simd::Level, $($arg: $ty),*) $(-> $ret)? {
                use $crate::simd::Level;
                match level {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU has the level's features (asserted).
                    Level::Avx512 => {
                        assert!(level <= $crate::simd::detected());
                        unsafe { avx512($($arg),*) }
                    }
                    #[cfg(target_arch = "x86_64")]
                    Level::Avx2 => {
                        assert!(level <= $crate::simd::detected());
                        unsafe { avx2($($arg),*) }
                    }
                    _ => imp($($arg),*),
                }
            }
        }
    };
}
pub(crate) use leveled;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        assert_eq!(Level::parse("AVX2"), Some(Level::Avx2));
        assert_eq!(Level::parse(" portable "), Some(Level::Portable));
        assert_eq!(Level::parse("avx512"), Some(Level::Avx512));
        assert_eq!(Level::parse("sse9"), None);
        assert!(Level::Portable < Level::Avx2 && Level::Avx2 < Level::Avx512);
        assert!(level() <= detected());
        assert_eq!(available()[0], Level::Portable);
        assert_eq!(*available().last().unwrap(), detected());
    }
}
