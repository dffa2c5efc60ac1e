//! Per-thread buffers of chunk values, reused from one chunk to the next. Every user writes a whole buffer
//! before reading it, so a reused buffer is not zeroed again: zeroing fresh buffers (and faulting in their
//! pages) was about 10% of a WARP merge's time. At most [`KEPT`] buffers of each type stay with a thread,
//! each at most a chunk long, so memory stays bounded.

use std::cell::RefCell;

/// Buffers kept per thread and element type.
const KEPT: usize = 16;

thread_local! {
    static F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static F64: RefCell<Vec<Vec<f64>>> = const { RefCell::new(Vec::new()) };
    static U8: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static U64: RefCell<Vec<Vec<u64>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `n` values whose contents are unspecified (zero or left by an earlier chunk).
fn take<T: Copy + Default>(pool: &RefCell<Vec<Vec<T>>>, n: usize) -> Vec<T> {
    let mut v = pool.borrow_mut().pop().unwrap_or_default();
    v.resize(n, T::default());
    v
}

fn give<T>(pool: &RefCell<Vec<Vec<T>>>, v: Vec<T>) {
    let mut p = pool.borrow_mut();
    if p.len() < KEPT && v.capacity() > 0 {
        p.push(v);
    }
}

/// `n` f32 values to be overwritten.
pub(super) fn f32s(n: usize) -> Vec<f32> {
    F32.with(|p| take(p, n))
}

/// `n` f64 values to be overwritten.
pub(super) fn f64s(n: usize) -> Vec<f64> {
    F64.with(|p| take(p, n))
}

/// `n` bytes to be overwritten.
pub(super) fn bytes(n: usize) -> Vec<u8> {
    U8.with(|p| take(p, n))
}

/// `n` u64 values to be overwritten.
pub(super) fn u64s(n: usize) -> Vec<u64> {
    U64.with(|p| take(p, n))
}

pub(super) fn give_u64(v: Vec<u64>) {
    U64.with(|p| give(p, v));
}

pub(super) fn give_bytes(v: Vec<u8>) {
    U8.with(|p| give(p, v));
}

pub(super) fn give_f32(v: Vec<f32>) {
    F32.with(|p| give(p, v));
}

pub(super) fn give_f64(v: Vec<f64>) {
    F64.with(|p| give(p, v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_have_the_asked_length_and_are_reused() {
        let mut a = f64s(10);
        assert_eq!(a.len(), 10);
        a.fill(7.0);
        let p = a.as_ptr();
        give_f64(a);
        let b = f64s(4);
        assert_eq!((b.len(), b.as_ptr()), (4, p));
        give_f64(b);
        let c = f64s(12);
        assert_eq!(c.len(), 12);
        give_f64(c);
        // Bounded: giving more than KEPT keeps KEPT.
        for _ in 0..KEPT + 5 {
            give_f32(vec![0.0; 3]);
        }
        F32.with(|p| assert_eq!(p.borrow().len(), KEPT));
    }
}
