//! Fused-kernel loops compiled for the widest vector extension this CPU has, chosen at
//! run time.
//!
//! The release binary targets baseline x86-64 so that it runs anywhere, which left the
//! fused kernels ([`crate::cpu::kernels`]) in 4-wide SSE while MKL's matmuls pick AVX-512
//! for themselves. [`simd_kernel!`] defines a function whose body is compiled three
//! times — baseline, AVX2+FMA and AVX-512 — and which calls the best one the CPU
//! supports ([`widest`]).

/// A vector extension a kernel can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    Baseline,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 F and VL (with AVX2 and FMA).
    Avx512,
}

/// The widest extension this CPU supports (std caches the detection).
pub fn widest() -> Extension {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("avx2") && has!("fma") {
            return Extension::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Extension::Avx2;
        }
    }
    Extension::Baseline
}

/// Defines `fn name(args)` running `body` compiled for [`widest`]'s extension. The body
/// should call only `#[inline(always)]` helpers in its hot loops, so they are compiled
/// for that extension too. Arguments are passed through by name, so they are plain
/// `name: Type` pairs; the function returns nothing.
///
/// Written `fn name<const FMA: bool>(args)`, the body sees `FMA` true where the extension
/// has fused multiply-adds (AVX2 and AVX-512 here; aarch64 always): Rust never fuses
/// `a * b + c` on its own, and `f32::mul_add` without the instruction is a slow libm
/// call, so helpers choose with it ([`mul_add`]).
macro_rules! simd_kernel {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $crate::cpu::simd::simd_kernel! {
            $(#[$attr])* $vis fn $name<const _FMA: bool>($($arg: $ty),*) $body
        }
    };
    ($(#[$attr:meta])* $vis:vis fn $name:ident<const $fma:ident: bool>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body<const $fma: bool>($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)] // calls the version for an extension `widest` detected
            fn dispatch($($arg: $ty),*) {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    body::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    body::<true>($($arg),*)
                }
                match $crate::cpu::simd::widest() {
                    // SAFETY: `widest` found these features on this CPU.
                    $crate::cpu::simd::Extension::Avx512 => unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::cpu::simd::Extension::Avx2 => unsafe { avx2($($arg),*) },
                    $crate::cpu::simd::Extension::Baseline => body::<false>($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            fn dispatch($($arg: $ty),*) {
                body::<{ cfg!(target_arch = "aarch64") }>($($arg),*)
            }

            dispatch($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// `a · b + c`, fused into one rounding where `FMA` (see [`simd_kernel!`]), else a
/// multiply and an add.
#[inline(always)]
pub fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[cfg(test)]
mod tests {
    use super::*;

    simd_kernel! {
        fn scale_and_sum(xs: &mut [f32], factor: f32, total: &mut f32) {
            for x in xs.iter_mut() {
                *x *= factor;
            }
            *total = xs.iter().sum();
        }
    }

    simd_kernel! {
        fn fused_or_not<const FMA: bool>(x: f32, fused: &mut bool, result: &mut f32) {
            *fused = FMA;
            *result = mul_add::<FMA>(x, x, -1.0);
        }
    }

    #[test]
    fn kernels_fuse_multiply_adds_where_the_extension_has_them() {
        let (mut fused, mut result) = (false, 0.0);
        // (1 + 2⁻¹²)² − 1 = 2⁻¹¹ + 2⁻²⁴: the last term is lost when the square is
        // rounded to f32 first.
        let x = 1.0 + f32::EPSILON * 2048.0;
        fused_or_not(x, &mut fused, &mut result);
        let has_fma = widest() != Extension::Baseline || cfg!(target_arch = "aarch64");
        assert_eq!(fused, has_fma);
        let exact = f64::from(x) * f64::from(x) - 1.0;
        match fused {
            true => assert_eq!(f64::from(result), exact),
            false => assert_ne!(f64::from(result), exact),
        }
    }

    #[test]
    fn a_kernel_runs_its_body_once_on_its_arguments() {
        let mut xs: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let mut total = 0.0;
        scale_and_sum(&mut xs, 0.5, &mut total);
        assert_eq!(total, 249_750.0);
        assert_eq!(xs[999], 499.5);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            assert_ne!(widest(), Extension::Baseline);
        }
    }
}
