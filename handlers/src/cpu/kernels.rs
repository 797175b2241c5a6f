//! Fused f32 CPU kernels for the non-matmul part of a transformer block, on plain
//! slices so they can be tested against scalar references.
//!
//! Why they exist (docs/cpu-performance.md has the profile): with candle's own ops a BERT
//! block makes a fresh tensor for every bias add, mask add, scale, softmax and residual,
//! runs exact GELU through scalar `erff` and softmax through scalar `expf`, and splits
//! the attention heads out with copies. Here each of those chains is one pass over
//! memory, the transcendental functions are branch-free polynomials that the compiler
//! vectorizes, and attention reads its heads straight out of the packed QKV matrix.

use crate::cpu::simd::{mul_add, simd_kernel};
use crate::cpu::team::for_each_chunk_mut;

/// erf(x), |error| < 5e-7 in f32 (1e-7 in exact arithmetic): the odd rational approximation on [-4, 4] that Eigen and
/// XLA use (outside that range erf is ±1 to f32 precision). Branch-free, so it vectorizes.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.9546e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_473_9e-2;
    x * p / q
}

/// e^x for x ≤ 88 (relative error ~1e-7; underflows to 0 below −87): 2^n · p(r) with
/// r = x − n·ln 2 and a degree-7 Taylor polynomial. Branch-free, so it vectorizes.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by adding and subtracting 1.5·2²³ (`f32::round` is a libm call
    // on baseline x86-64, which would stop the loop from vectorizing).
    const ROUNDER: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUNDER) - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0_f32;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Rows per parallel task: enough work per task that splitting pays.
fn rows_per_task(columns: usize) -> usize {
    (16_384 / columns.max(1)).max(1)
}

/// `x[r, c] = gelu(x[r, c] + bias[c])` with the exact (erf) GELU, in place.
pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
    let columns = bias.len();
    for_each_chunk_mut(x, columns * rows_per_task(columns), |_, rows| {
        bias_gelu_rows(rows, bias)
    });
}

simd_kernel! {
    fn bias_gelu_rows(rows: &mut [f32], bias: &[f32]) {
        for row in rows.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                let y = *v + b;
                *v = 0.5 * y * (1.0 + erf(y * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
    }
}

/// SwiGLU's gate, in place: `gate[i] = silu(gate[i]) · up[i]`, silu(x) = x / (1 + e^−x).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    const PER_TASK: usize = 16_384;
    for_each_chunk_mut(gate, PER_TASK, |index, gate| {
        silu_mul_chunk(gate, &up[index * PER_TASK..])
    });
}

simd_kernel! {
    fn silu_mul_chunk(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }
}

/// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) · weight` for each row of `x` (RMSNorm, as
/// candle-nn computes it but for the sum of squares, taken in 16 lanes), on the team
/// instead of candle-nn's rayon pool, which fought the team's spinning threads for the
/// cores between a prompt's matmuls.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let columns = weight.len();
    let per_task = columns * rows_per_task(columns);
    for_each_chunk_mut(out, per_task, |index, out| {
        rms_norm_rows(&x[index * per_task..][..out.len()], weight, eps, out)
    });
}

simd_kernel! {
    fn rms_norm_rows<const FMA: bool>(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let n = weight.len();
        for (x, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let mut lanes = [0.0f32; LANES];
            let blocks = x.chunks_exact(LANES);
            let rest: f32 = blocks.remainder().iter().map(|v| v * v).sum();
            for block in blocks {
                for (l, v) in lanes.iter_mut().zip(block) {
                    *l = mul_add::<FMA>(*v, *v, *l);
                }
            }
            let squares = lanes.iter().sum::<f32>() + rest;
            let m = (squares / n as f32 + eps).sqrt();
            for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
                *o = *v / m * *w;
            }
        }
    }
}

/// Rotates `x` `[batch, tokens, heads, head_dim]` by RoPE (non-interleaved halves, as
/// candle-nn's `rope`: equal bit for bit) and writes it heads first, `out` `[batch,
/// heads, tokens, head_dim]`: the transpose attention needs and the rotation in one pass
/// on the team. `cos`/`sin` are `[tokens, head_dim / 2]`, or `[batch, tokens, head_dim / 2]`
/// (each row at its own positions).
pub fn rope_heads_first(x: &[f32], cos: &[f32], sin: &[f32], shape: RopeShape, out: &mut [f32]) {
    let RopeShape {
        heads,
        tokens,
        head_dim,
    } = shape;
    let half = head_dim / 2;
    let batched = cos.len() > tokens * half;
    for_each_chunk_mut(out, tokens * head_dim, |bh, out| {
        let (b, h) = (bh / heads, bh % heads);
        let angles = if batched { b * tokens * half } else { 0 };
        let x = &x[b * tokens * heads * head_dim..];
        rope_head(
            x,
            &cos[angles..][..tokens * half],
            &sin[angles..][..tokens * half],
            h * head_dim,
            heads * head_dim,
            head_dim,
            out,
        )
    });
}

/// The dimensions of [`rope_heads_first`]'s input.
#[derive(Debug, Clone, Copy)]
pub struct RopeShape {
    pub heads: usize,
    pub tokens: usize,
    pub head_dim: usize,
}

simd_kernel! {
    /// One head of [`rope_heads_first`]: token t's `head_dim` values start at
    /// `x[t · stride + first]`; `out` `[tokens, head_dim]`.
    fn rope_head(x: &[f32], cos: &[f32], sin: &[f32], first: usize, stride: usize, head_dim: usize, out: &mut [f32]) {
        let half = head_dim / 2;
        for (t, out) in out.chunks_exact_mut(head_dim).enumerate() {
            let x = &x[t * stride + first..][..head_dim];
            let (cos, sin) = (&cos[t * half..][..half], &sin[t * half..][..half]);
            let (x1, x2) = x.split_at(half);
            let (o1, o2) = out.split_at_mut(half);
            for i in 0..half {
                o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                o2[i] = x1[i] * sin[i] + x2[i] * cos[i];
            }
        }
    }
}

/// Parameters of a LayerNorm over the last dimension.
pub struct Norm<'a> {
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub eps: f32,
}

/// `x[r] = LayerNorm(x[r] + bias + residual[r])`, in place (BERT's "add & norm").
pub fn bias_residual_layer_norm(x: &mut [f32], bias: &[f32], residual: &[f32], norm: &Norm<'_>) {
    let columns = bias.len();
    let per_task = columns * rows_per_task(columns);
    for_each_chunk_mut(x, per_task, |index, rows| {
        add_norm_rows(rows, bias, &residual[index * per_task..], norm)
    });
}

simd_kernel! {
    fn add_norm_rows(rows: &mut [f32], bias: &[f32], residual: &[f32], norm: &Norm<'_>) {
        let columns = bias.len();
        for (row, res) in rows
            .chunks_exact_mut(columns)
            .zip(residual.chunks_exact(columns))
        {
            for ((v, b), r) in row.iter_mut().zip(bias).zip(res) {
                *v += b + r;
            }
            let mean = sum(row) / columns as f32;
            let mut var = 0.0;
            for v in row.iter_mut() {
                *v -= mean;
                var += *v * *v;
            }
            let scale = 1.0 / (var / columns as f32 + norm.eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(norm.gamma).zip(norm.beta) {
                *v = *v * scale * g + b;
            }
        }
    }
}

/// Sum with 16 independent accumulators, so it vectorizes.
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest element (−∞ for none) with 16 independent accumulators, so it vectorizes.
#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// Dot product with 16 independent accumulators, so it vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Shape of a packed self-attention: `batch` sequences of `tokens`, `heads` × `head_dim`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Bidirectional multi-head self-attention straight from the packed projection.
///
/// `qkv` is `[batch · tokens, 3 · hidden]` (query, key, value blocks side by side, each
/// `heads × head_dim`, before their bias); `bias` is the `3 · hidden` projection bias;
/// `keep[b · tokens + j]` says whether token j of sequence b may be attended to (padding
/// may not). Writes softmax(q·kᵀ·scale)·v to `out`, `[batch · tokens, hidden]`, the heads
/// concatenated as BERT's output projection expects. Masked keys get weight exactly 0, as
/// adding the dtype's most negative value does in transformers.
pub fn self_attention(
    qkv: &[f32],
    bias: &[f32],
    keep: &[bool],
    shape: AttentionShape,
    out: &mut [f32],
) {
    let (tokens, hidden) = (shape.tokens, shape.heads * shape.head_dim);
    for_each_chunk_mut(out, tokens * hidden, |b, out| {
        let rows = &qkv[b * tokens * 3 * hidden..(b + 1) * tokens * 3 * hidden];
        attend_sequence(rows, bias, &keep[b * tokens..(b + 1) * tokens], shape, out)
    });
}

simd_kernel! {
    /// [`self_attention`] of one sequence: `rows` its `[tokens, 3 · hidden]` projections.
    fn attend_sequence<const FMA: bool>(rows: &[f32], bias: &[f32], keep: &[bool], shape: AttentionShape, out: &mut [f32]) {
        let AttentionShape {
            tokens,
            heads,
            head_dim,
            ..
        } = shape;
        let hidden = heads * head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let kept: Vec<usize> = (0..tokens).filter(|&j| keep[j]).collect();
        let n = kept.len();
        // Register blocking, as in a matmul: the scores of ROWS queries × LANES keys, and
        // the outputs of ROWS queries × LANES columns, build up in ROWS independent
        // registers. With one short dot product (and horizontal sum) per query and key,
        // attention took 4 ms of a 27 ms MiniLM batch-8 forward on one thread.
        let padded = n.div_ceil(LANES) * LANES;
        let queries = tokens.div_ceil(ROWS) * ROWS;
        // Keys transposed (`kt[d · padded + slot]`), values row-major, queries scaled.
        let mut kt = vec![0.0f32; head_dim * padded];
        let mut v = vec![0.0f32; n * head_dim];
        let mut q = vec![0.0f32; queries * head_dim];
        let mut scores = vec![0.0f32; queries * padded];
        for h in 0..heads {
            let (qo, ko, vo) = (
                h * head_dim,
                hidden + h * head_dim,
                2 * hidden + h * head_dim,
            );
            let (key_bias, value_bias) = (&bias[ko..ko + head_dim], &bias[vo..vo + head_dim]);
            for ((slot, &j), vj) in kept.iter().enumerate().zip(v.chunks_exact_mut(head_dim)) {
                let row = &rows[j * 3 * hidden..(j + 1) * 3 * hidden];
                for (ktd, (x, b)) in kt
                    .chunks_exact_mut(padded)
                    .zip(row[ko..ko + head_dim].iter().zip(key_bias))
                {
                    ktd[slot] = x + b;
                }
                for ((dst, x), b) in vj.iter_mut().zip(&row[vo..vo + head_dim]).zip(value_bias) {
                    *dst = x + b;
                }
            }
            for (i, qi) in q.chunks_exact_mut(head_dim).take(tokens).enumerate() {
                let row = &rows[i * 3 * hidden + qo..][..head_dim];
                for ((q, x), b) in qi.iter_mut().zip(row).zip(&bias[qo..qo + head_dim]) {
                    *q = (x + b) * scale;
                }
            }
            for (qs, s) in q
                .chunks_exact(ROWS * head_dim)
                .zip(scores.chunks_exact_mut(ROWS * padded))
            {
                score_rows::<FMA>(qs, &kt, padded, padded / LANES, s);
            }
            for s in scores.chunks_exact_mut(padded).take(tokens) {
                softmax_in_place(&mut s[..n]);
            }
            for (group, p) in scores.chunks_exact(ROWS * padded).enumerate() {
                let rows_here = ROWS.min(tokens - group * ROWS);
                let first = group * ROWS * hidden + h * head_dim;
                weighted_rows::<FMA>(p, padded, &v, head_dim, rows_here, out, first, hidden);
            }
        }
    }
}

/// Scores of `ROWS` queries (`qs` `[ROWS, head_dim]`, already scaled) against the first
/// `blocks` lane blocks of keys in `kt` (`[head_dim, padded]`, keys transposed) into `s`
/// (`[ROWS, padded]`): each 4 × 16 block of scores builds up in registers.
#[inline(always)]
fn score_rows<const FMA: bool>(
    qs: &[f32],
    kt: &[f32],
    padded: usize,
    blocks: usize,
    s: &mut [f32],
) {
    let head_dim = kt.len() / padded;
    for block in 0..blocks {
        let mut acc = [[0.0f32; LANES]; ROWS];
        for (d, k) in kt.chunks_exact(padded).enumerate() {
            let k = lanes(&k[block * LANES..]);
            for (r, acc) in acc.iter_mut().enumerate() {
                axpy_lanes::<FMA>(acc, qs[r * head_dim + d], k);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            s[r * padded + block * LANES..][..LANES].copy_from_slice(acc);
        }
    }
}

/// `s = softmax(s)`.
#[inline(always)]
fn softmax_in_place(s: &mut [f32]) {
    let max = max(s);
    for w in s.iter_mut() {
        *w = exp(*w - max);
    }
    let norm = 1.0 / sum(s);
    for w in s.iter_mut() {
        *w *= norm;
    }
}

/// `rows_here` (≤ `ROWS`) rows of `p · v`: `p` `[ROWS, padded]` weighs the rows of `v`
/// (`[keys, head_dim]`); output row r goes to `out[first + r · row_stride..][..head_dim]`.
/// Each 4 × 16 block of outputs builds up in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weighted_rows<const FMA: bool>(
    p: &[f32],
    padded: usize,
    v: &[f32],
    head_dim: usize,
    rows_here: usize,
    out: &mut [f32],
    first: usize,
    row_stride: usize,
) {
    let at = |r: usize, c: usize| first + r * row_stride + c;
    let mut columns = 0;
    while columns + LANES <= head_dim {
        let mut acc = [[0.0f32; LANES]; ROWS];
        for (j, vj) in v.chunks_exact(head_dim).enumerate() {
            let vj = lanes(&vj[columns..]);
            for (r, acc) in acc.iter_mut().enumerate() {
                axpy_lanes::<FMA>(acc, p[r * padded + j], vj);
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows_here) {
            out[at(r, columns)..][..LANES].copy_from_slice(acc);
        }
        columns += LANES;
    }
    for c in columns..head_dim {
        for r in 0..rows_here {
            out[at(r, c)] = v
                .chunks_exact(head_dim)
                .enumerate()
                .map(|(j, vj)| p[r * padded + j] * vj[c])
                .sum();
        }
    }
}

/// Vector width the register-blocked loops are written for (one AVX-512 register).
const LANES: usize = 16;
/// Queries whose sums build up side by side (independent registers hide add latency).
const ROWS: usize = 4;
/// Fewest queries of a causal head that go through the register-blocked path (a
/// decode step's one query is faster one key at a time).
const BLOCKED_MIN_QUERIES: usize = 2 * ROWS;

/// The first `LANES` elements of `x` as an array (one bounds check, then none).
#[inline(always)]
fn lanes(x: &[f32]) -> &[f32; LANES] {
    x[..LANES].try_into().expect("a whole lane block")
}

/// `acc += a · x`.
#[inline(always)]
fn axpy_lanes<const FMA: bool>(acc: &mut [f32; LANES], a: f32, x: &[f32; LANES]) {
    for (s, x) in acc.iter_mut().zip(x) {
        *s = mul_add::<FMA>(a, *x, *s);
    }
}

/// `out[v · rows + r] = x[r] · w[v]` for a few `rows` of `x` (`[rows, k]`) against a
/// large `w` (`[n, k]`), `out` being `[n, rows]`: each row of `w` is read from memory
/// once and used for every row of `x` while it is in cache. For a decode step's output
/// head, where MKL's sgemm with a handful of rows first copies the whole weight into its
/// panel layout (SmolLM2: 12 ms for 8 rows against 3 ms for one).
pub fn few_rows_times_weight(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    const WEIGHT_ROWS_PER_TASK: usize = 512;
    let rows = x.len() / k.max(1);
    for_each_chunk_mut(out, WEIGHT_ROWS_PER_TASK * rows.max(1), |index, out| {
        let first = index * WEIGHT_ROWS_PER_TASK;
        dot_weight_rows(x, &w[first * k..], k, out)
    });
}

simd_kernel! {
    fn dot_weight_rows(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
        let rows = x.len() / k;
        for (wv, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
            for (o, xr) in o.iter_mut().zip(x.chunks_exact(k)) {
                *o = dot(xr, wv);
            }
        }
    }
}

/// Shape of a causal grouped-query attention step: `queries` new tokens of each
/// sequence attend to its cached keys (the new ones last), `heads` query heads sharing
/// `kv_heads` key/value heads of `head_dim`.
#[derive(Debug, Clone, Copy)]
pub struct CausalShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub queries: usize,
    pub head_dim: usize,
}

/// One sequence's cached keys and values: `kv_heads` blocks `stride` elements apart,
/// each holding `keys` rows of `head_dim` first (the rest of a block is spare capacity).
#[derive(Debug, Clone, Copy)]
pub struct CachedKeys<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub keys: usize,
    /// The first key attended to (a sliding window's start; 0 for the whole cache).
    pub first: usize,
    pub stride: usize,
}

/// Causal grouped-query attention of several sequences at once, each over its own
/// cache: `q` `[rows.len(), heads, queries, head_dim]` → `out`, same shape. Query i of
/// row b sits at position `rows[b].keys − queries + i` and attends to keys
/// `rows[b].first`..=that position; query head h reads key/value head `h / (heads / kv_heads)` (no repeated
/// copies). All rows' heads are one parallel loop.
pub fn causal_attention(q: &[f32], rows: &[CachedKeys<'_>], shape: CausalShape, out: &mut [f32]) {
    let CausalShape {
        heads,
        kv_heads,
        queries,
        head_dim,
    } = shape;
    let group = heads / kv_heads;
    for_each_chunk_mut(out, queries * head_dim, |bh, out| {
        let (row, h) = (rows[bh / heads], bh % heads);
        let at = (h / group) * row.stride;
        let (from, to) = (at + row.first * head_dim, at + row.keys * head_dim);
        let q = &q[bh * queries * head_dim..(bh + 1) * queries * head_dim];
        attend_head(q, &row.k[from..to], &row.v[from..to], head_dim, out)
    });
}

simd_kernel! {
    /// [`causal_attention`] of one query head: its `q` `[queries, head_dim]` over the
    /// `k`/`v` `[keys, head_dim]` of its key/value head.
    fn attend_head<const FMA: bool>(q: &[f32], k: &[f32], v: &[f32], head_dim: usize, out: &mut [f32]) {
        let (queries, keys) = (q.len() / head_dim, k.len() / head_dim);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let offset = keys - queries;
        if queries >= BLOCKED_MIN_QUERIES {
            // A prompt: queries × keys in register blocks, as BERT's attention does.
            let padded = keys.div_ceil(LANES) * LANES;
            let mut kt = vec![0.0f32; head_dim * padded];
            for (j, kj) in k.chunks_exact(head_dim).enumerate() {
                for (ktd, x) in kt.chunks_exact_mut(padded).zip(kj) {
                    ktd[j] = *x;
                }
            }
            let mut qs = vec![0.0f32; queries.div_ceil(ROWS) * ROWS * head_dim];
            for (s, x) in qs.iter_mut().zip(q) {
                *s = x * scale;
            }
            let mut scores = vec![0.0f32; ROWS * padded];
            for (group, qs) in qs.chunks_exact(ROWS * head_dim).enumerate() {
                let rows_here = ROWS.min(queries - group * ROWS);
                // The group's last query sees the most keys; earlier ones fewer.
                let seen = offset + group * ROWS + rows_here;
                score_rows::<FMA>(qs, &kt, padded, seen.div_ceil(LANES), &mut scores);
                for (r, s) in scores.chunks_exact_mut(padded).enumerate() {
                    let visible = if r < rows_here { offset + group * ROWS + r + 1 } else { 0 };
                    softmax_in_place(&mut s[..visible]);
                    s[visible..seen].fill(0.0);
                }
                let v = &v[..seen * head_dim];
                weighted_rows::<FMA>(&scores, padded, v, head_dim, rows_here, out, group * ROWS * head_dim, head_dim);
            }
            return;
        }
        let mut weights = vec![0.0f32; keys];
        for (i, (qi, o)) in q
            .chunks_exact(head_dim)
            .zip(out.chunks_exact_mut(head_dim))
            .enumerate()
        {
            let visible = offset + i + 1;
            let weights = &mut weights[..visible];
            let mut max = f32::NEG_INFINITY;
            for (w, kj) in weights.iter_mut().zip(k.chunks_exact(head_dim)) {
                *w = dot(qi, kj) * scale;
                max = max.max(*w);
            }
            for w in weights.iter_mut() {
                *w = exp(*w - max);
            }
            let norm = 1.0 / sum(weights);
            o.fill(0.0);
            for (w, vj) in weights.iter().zip(v.chunks_exact(head_dim)) {
                let w = w * norm;
                for (o, x) in o.iter_mut().zip(vj) {
                    *o += w * x;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf_f64(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.28-free reference: a 60-term Taylor series is exact
        // to f64 precision for |x| ≤ 3, and erf is 1 − 2e-5 or closer beyond that.
        if x.abs() > 3.0 {
            return x.signum() * (1.0 - libm_erfc_tail(x.abs()));
        }
        let mut term = x;
        let mut total = x;
        for n in 1..80 {
            term *= -x * x / n as f64;
            total += term / (2 * n + 1) as f64;
        }
        total * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// erfc(x) for x > 3 by its continued fraction.
    fn libm_erfc_tail(x: f64) -> f64 {
        let mut f = x;
        for k in (1..60).rev() {
            f = x + (k as f64 / 2.0) / f;
        }
        (-x * x).exp() / (f * std::f64::consts::PI.sqrt())
    }

    #[test]
    fn erf_is_within_5e_7_everywhere() {
        let worst = (-120_000..=120_000)
            .map(|i| i as f32 / 10_000.0)
            .map(|x| (f64::from(erf(x)) - erf_f64(f64::from(x))).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "worst |error| {worst}");
    }

    #[test]
    fn exp_is_within_3e_7_relative() {
        let worst = (-87_000..=88_000)
            .map(|i| i as f32 / 1000.0)
            .map(|x| {
                let want = f64::from(x).exp();
                (f64::from(exp(x)) - want).abs() / want
            })
            .fold(0.0, f64::max);
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        }
    }

    #[test]
    fn layer_norm_matches_the_textbook_formula() {
        let (rows, cols) = (37, 48);
        let mut next = rng(1);
        let x: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let res: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let bias: Vec<f32> = (0..cols).map(|_| next()).collect();
        let gamma: Vec<f32> = (0..cols).map(|_| next()).collect();
        let beta: Vec<f32> = (0..cols).map(|_| next()).collect();
        let mut got = x.clone();
        let norm = Norm {
            gamma: &gamma,
            beta: &beta,
            eps: 1e-12,
        };
        bias_residual_layer_norm(&mut got, &bias, &res, &norm);
        for r in 0..rows {
            let y: Vec<f64> = (0..cols)
                .map(|c| f64::from(x[r * cols + c] + bias[c] + res[r * cols + c]))
                .collect();
            let mean = y.iter().sum::<f64>() / cols as f64;
            let var = y.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
            for c in 0..cols {
                let want =
                    (y[c] - mean) / (var + 1e-12).sqrt() * f64::from(gamma[c]) + f64::from(beta[c]);
                let diff = (f64::from(got[r * cols + c]) - want).abs();
                assert!(diff < 1e-5, "row {r} col {c}: {diff}");
            }
        }
    }

    #[test]
    fn attention_matches_a_naive_masked_softmax() {
        // Fewer keys than a lane block with a partial column block; more than one of each.
        for (tokens, head_dim) in [(5, 20), (19, 32)] {
            check_attention(AttentionShape {
                batch: 3,
                tokens,
                heads: 2,
                head_dim,
            });
        }
    }

    fn check_attention(shape: AttentionShape) {
        let hidden = shape.heads * shape.head_dim;
        let n = shape.batch * shape.tokens;
        let mut next = rng(7);
        let qkv: Vec<f32> = (0..n * 3 * hidden).map(|_| next()).collect();
        let bias: Vec<f32> = (0..3 * hidden).map(|_| next()).collect();
        // Sequence 1 ends in two padding tokens, sequence 2 has a hole in the middle.
        let t = shape.tokens;
        let keep: Vec<bool> = (0..n)
            .map(|i| i != 2 * t - 1 && i != 2 * t - 2 && i != 2 * t + 2)
            .collect();
        let mut got = vec![f32::NAN; n * hidden];
        self_attention(&qkv, &bias, &keep, shape, &mut got);
        let at = |row: usize, col: usize| f64::from(qkv[row * 3 * hidden + col] + bias[col]);
        let scale = 1.0 / (shape.head_dim as f64).sqrt();
        for b in 0..shape.batch {
            for h in 0..shape.heads {
                for i in 0..shape.tokens {
                    let qi = b * shape.tokens + i;
                    let scores: Vec<Option<f64>> = (0..shape.tokens)
                        .map(|j| {
                            let kj = b * shape.tokens + j;
                            keep[kj].then(|| {
                                (0..shape.head_dim)
                                    .map(|d| {
                                        at(qi, h * shape.head_dim + d)
                                            * at(kj, hidden + h * shape.head_dim + d)
                                    })
                                    .sum::<f64>()
                                    * scale
                            })
                        })
                        .collect();
                    let max = scores.iter().flatten().fold(f64::MIN, |a, &b| a.max(b));
                    let total: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                    for d in 0..shape.head_dim {
                        let want: f64 = scores
                            .iter()
                            .enumerate()
                            .filter_map(|(j, s)| s.map(|s| (j, s)))
                            .map(|(j, s)| {
                                (s - max).exp() / total
                                    * at(b * shape.tokens + j, 2 * hidden + h * shape.head_dim + d)
                            })
                            .sum();
                        let diff =
                            (f64::from(got[qi * hidden + h * shape.head_dim + d]) - want).abs();
                        assert!(diff < 1e-5, "b{b} h{h} i{i} d{d}: {diff}");
                    }
                }
            }
        }
    }

    #[test]
    fn few_rows_times_weight_matches_a_naive_product() {
        let mut next = rng(11);
        let (k, n) = (37, 1100);
        for rows in [1, 3, 8] {
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let mut out = vec![f32::NAN; n * rows];
            few_rows_times_weight(&x, &w, k, &mut out);
            for v in 0..n {
                for r in 0..rows {
                    let want: f64 = (0..k)
                        .map(|i| f64::from(x[r * k + i]) * f64::from(w[v * k + i]))
                        .sum();
                    let got = f64::from(out[v * rows + r]);
                    assert!((got - want).abs() < 1e-4, "v{v} r{r}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn causal_attention_matches_a_naive_grouped_softmax() {
        // Two sequences with different numbers of cached keys, in caches with spare room:
        // a few queries (one key at a time) and a prompt (register blocks, more than one
        // block of keys and a partial block of columns).
        check_causal_attention(3, [7, 4], 9);
        check_causal_attention(11, [20, 11], 24);
    }

    fn check_causal_attention(queries: usize, keys: [usize; 2], capacity: usize) {
        let (heads, kv_heads, head_dim) = (6, 2, 18);
        let shape = CausalShape {
            heads,
            kv_heads,
            queries,
            head_dim,
        };
        let mut next = rng(11);
        let q: Vec<f32> = (0..keys.len() * heads * queries * head_dim)
            .map(|_| next())
            .collect();
        let caches: Vec<(Vec<f32>, Vec<f32>)> = keys
            .iter()
            .map(|_| {
                let n = kv_heads * capacity * head_dim;
                (
                    (0..n).map(|_| next()).collect(),
                    (0..n).map(|_| next()).collect(),
                )
            })
            .collect();
        let rows: Vec<CachedKeys<'_>> = caches
            .iter()
            .zip(keys)
            .map(|((k, v), keys)| CachedKeys {
                k,
                v,
                keys,
                first: 0,
                stride: capacity * head_dim,
            })
            .collect();
        let mut got = vec![f32::NAN; q.len()];
        causal_attention(&q, &rows, shape, &mut got);
        let scale = 1.0 / (head_dim as f64).sqrt();
        for (b, (k, v)) in caches.iter().enumerate() {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let cached = |t: &[f32], j: usize, d: usize| {
                    f64::from(t[(kvh * capacity + j) * head_dim + d])
                };
                let query = |i: usize, d: usize| {
                    f64::from(q[((b * heads + h) * queries + i) * head_dim + d])
                };
                for i in 0..queries {
                    let visible = keys[b] - queries + i + 1;
                    let scores: Vec<f64> = (0..visible)
                        .map(|j| {
                            (0..head_dim)
                                .map(|d| query(i, d) * cached(k, j, d))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for d in 0..head_dim {
                        let want: f64 = scores
                            .iter()
                            .enumerate()
                            .map(|(j, s)| (s - max).exp() / total * cached(v, j, d))
                            .sum();
                        let got = f64::from(got[((b * heads + h) * queries + i) * head_dim + d]);
                        assert!(
                            (got - want).abs() < 1e-5,
                            "b{b} h{h} i{i} d{d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_its_definition() {
        let mut next = rng(5);
        let gate: Vec<f32> = (0..40_000).map(|_| next() * 4.0).collect();
        let up: Vec<f32> = (0..40_000).map(|_| next() * 4.0).collect();
        let mut got = gate.clone();
        silu_mul(&mut got, &up);
        for (i, ((o, g), u)) in got.iter().zip(&gate).zip(&up).enumerate() {
            let (g, u) = (f64::from(*g), f64::from(*u));
            let want = g / (1.0 + (-g).exp()) * u;
            let diff = (f64::from(*o) - want).abs();
            assert!(diff < 1e-5 * (1.0 + want.abs()), "{i}: {diff}");
        }
    }

    #[test]
    fn bias_gelu_matches_the_erf_definition() {
        let mut next = rng(3);
        let bias: Vec<f32> = (0..24).map(|_| next()).collect();
        let x: Vec<f32> = (0..24 * 9).map(|_| next() * 3.0).collect();
        let mut got = x.clone();
        bias_gelu(&mut got, &bias);
        for (i, (g, v)) in got.iter().zip(&x).enumerate() {
            let y = f64::from(v + bias[i % 24]);
            let want = 0.5 * y * (1.0 + erf_f64(y / std::f64::consts::SQRT_2));
            assert!((f64::from(*g) - want).abs() < 1e-6, "{i}: {g} vs {want}");
        }
    }
}
