//! slmesh patch: the quantised matrix product of 4-bit weights (Q4_0, Q4_1) in tiles, on
//! AVX2. `k_quants::matmul` dotted one weight column with one input row at a time
//! (`vec_dot`): each call unpacked the column's nibbles again, summed into one
//! accumulator (every block waited for the one before) and reduced it horizontally. A
//! tile here takes a few columns and a few rows at once: each column's nibbles are
//! unpacked once per block for all the rows, each row's bytes loaded once for all the
//! columns, and every (column, row) pair has its own accumulator. Q4_1 had no SIMD
//! kernel at all in this release (scalar `vec_dot_unopt`).
//!
//! Both kinds store a block as `d * nibble + offset` (Q4_0: offset `-8 * d`; Q4_1: its
//! `m`), so a block's dot product with an 8-bit input block (`d_a * q`, `sum_a` = the
//! input block's values summed) is `d * d_a * sum(nibble * q) + offset * sum_a`: the
//! nibbles go into `maddubs` unsigned, as they are, and the offsets are added once per
//! block. Results differ from `vec_dot`'s only in the order of float additions.
//!
//! Q8_0 weights go through the same tiles as `d * (q + 128) - 128 * d`, their bytes moved
//! up by 128 to be unsigned, where the CPU has VNNI (below): `maddubs` would saturate on
//! them. Its offsets' share cancels most of the sums' size, so results differ from
//! `vec_dot`'s by float rounding a little more than the 4-bit kinds' do.
//!
//! Where the CPU has VNNI (AVX-VNNI, or AVX-512 VNNI with VL), each block's integer dot
//! product is one `vpdpbusd` instead of `maddubs` then `madd`: the same sums of four
//! adjacent products in each lane (a nibble times a byte, at most 15 * 127 * 2 in a pair,
//! never saturates `maddubs`), so the same bits. The crate is built for x86-64-v3 (AVX2);
//! the VNNI kernels are compiled beside it and chosen when the process starts.

use super::k_quants::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};
use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86")]
use core::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// A weight block of 32 values `d * u + offset`, `u` unsigned: four bits (Q4_0, Q4_1) or
/// eight (Q8_0, its signed bytes moved up by 128).
pub(crate) trait WeightBlock: Sync {
    /// Eight-bit `u` saturates `maddubs`' pairs (255 * 127 * 2 > 32767): such a kind goes
    /// through the tiles only where the CPU has VNNI, whose sums of four do not.
    const NEEDS_VNNI: bool = false;
    fn scale(&self) -> f32;
    fn offset(&self) -> f32;
    /// The 32 values of `u`, in order.
    unsafe fn unsigned(&self) -> __m256i;
}

/// An input block of 32 signed bytes, `d * q`.
pub(crate) trait ByteBlock: Sync {
    fn scale(&self) -> f32;
    /// `d * sum(q)`.
    fn scaled_sum(&self) -> f32;
    fn bytes(&self) -> *const i8;
}

impl WeightBlock for BlockQ4_0 {
    fn scale(&self) -> f32 {
        f16::to_f32(self.d)
    }
    fn offset(&self) -> f32 {
        -8.0 * f16::to_f32(self.d)
    }
    #[inline(always)]
    unsafe fn unsigned(&self) -> __m256i {
        nibbles_32(self.qs.as_ptr())
    }
}

impl WeightBlock for BlockQ4_1 {
    fn scale(&self) -> f32 {
        f16::to_f32(self.d)
    }
    fn offset(&self) -> f32 {
        f16::to_f32(self.m)
    }
    #[inline(always)]
    unsafe fn unsigned(&self) -> __m256i {
        nibbles_32(self.qs.as_ptr())
    }
}

/// `d * q` = `d * (q + 128) - 128 * d`.
impl WeightBlock for BlockQ8_0 {
    const NEEDS_VNNI: bool = true;
    fn scale(&self) -> f32 {
        f16::to_f32(self.d)
    }
    fn offset(&self) -> f32 {
        -128.0 * f16::to_f32(self.d)
    }
    #[inline(always)]
    unsafe fn unsigned(&self) -> __m256i {
        _mm256_xor_si256(_mm256_loadu_si256(self.qs.as_ptr() as *const __m256i), _mm256_set1_epi8(-128))
    }
}

impl ByteBlock for BlockQ8_0 {
    fn scale(&self) -> f32 {
        f16::to_f32(self.d)
    }
    fn scaled_sum(&self) -> f32 {
        f16::to_f32(self.d) * self.qs.iter().map(|&q| q as i32).sum::<i32>() as f32
    }
    fn bytes(&self) -> *const i8 {
        self.qs.as_ptr()
    }
}

impl ByteBlock for BlockQ8_1 {
    fn scale(&self) -> f32 {
        f16::to_f32(self.d)
    }
    /// As `BlockQ4_1::vec_dot_unopt` reads it: stored when the input was quantised.
    fn scaled_sum(&self) -> f32 {
        f16::to_f32(self.s)
    }
    fn bytes(&self) -> *const i8 {
        self.qs.as_ptr()
    }
}

/// One input row: its blocks, and their scales and sums as f32 (read for every column).
struct Row<'a, A> {
    blocks: &'a [A],
    scales: Vec<f32>,
    sums: Vec<f32>,
}

/// One weight column: its blocks, and their scales and offsets as f32 (read for every
/// row), in buffers a task reuses column after column.
struct Column<'a, W> {
    blocks: &'a [W],
    scales: &'a [f32],
    offsets: &'a [f32],
}

#[inline(always)]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    let tmp = _mm_loadu_si128(p as *const __m128i);
    let bytes = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4));
    _mm256_and_si256(_mm256_set1_epi8(0xF), bytes)
}

/// How a block's integer dot product is computed: a const parameter of every kernel, so
/// that each is compiled once per instruction set (`Settings::dot`).
const AVX2: u8 = 0;
const AVX_VNNI: u8 = 1;
const AVX512_VNNI: u8 = 2;

/// Eight lanes, each the sum of four adjacent `nibble * byte` products. The VNNI arms are
/// only instantiated inside the `task_*` functions that enable their instruction set.
#[inline(always)]
unsafe fn block_dot<const DOT: u8>(nib: __m256i, q: __m256i) -> __m256i {
    match DOT {
        AVX_VNNI => _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), nib, q),
        AVX512_VNNI => _mm256_dpbusd_epi32(_mm256_setzero_si256(), nib, q),
        _ => _mm256_madd_epi16(_mm256_maddubs_epi16(nib, q), _mm256_set1_epi16(1)),
    }
}

#[inline(always)]
unsafe fn hsum(x: __m256) -> f32 {
    let res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    _mm_cvtss_f32(_mm_add_ss(res, _mm_movehdup_ps(res)))
}

/// `sum(a[b] * b[b])`, eight at a time.
#[inline(always)]
unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), acc);
        i += 8;
    }
    let mut sum = hsum(acc);
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

/// `RN` weight columns dotted with `RM` input rows: `out[j][i]`. The main loop holds
/// `RN * RM` accumulators, `RN` columns' nibbles and one row's bytes in the 16 AVX2
/// registers; the scales come from memory as broadcasts (load ports, not arithmetic),
/// and the offsets' share is added at the end as one f32 dot product per pair.
#[inline(always)]
unsafe fn tile<W: WeightBlock, A: ByteBlock, const RN: usize, const RM: usize, const DOT: u8>(
    cols: [&Column<W>; RN],
    rows: [&Row<A>; RM],
) -> [[f32; RM]; RN] {
    let mut acc = [[_mm256_setzero_ps(); RM]; RN];
    let blocks = cols[0].blocks.len();
    let col_blocks = cols.map(|c| c.blocks.as_ptr());
    let col_scales = cols.map(|c| c.scales.as_ptr());
    let row_blocks = rows.map(|r| r.blocks.as_ptr());
    let row_scales = rows.map(|r| r.scales.as_ptr());
    for b in 0..blocks {
        let mut nib = [_mm256_setzero_si256(); RN];
        for j in 0..RN {
            nib[j] = (*col_blocks[j].add(b)).unsigned();
        }
        for i in 0..RM {
            let q = _mm256_loadu_si256((*row_blocks[i].add(b)).bytes() as *const __m256i);
            let da = _mm256_broadcast_ss(&*row_scales[i].add(b));
            for j in 0..RN {
                let dot = block_dot::<DOT>(nib[j], q);
                let scale = _mm256_mul_ps(_mm256_broadcast_ss(&*col_scales[j].add(b)), da);
                acc[j][i] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc[j][i]);
            }
        }
    }
    let mut out = [[0f32; RM]; RN];
    for j in 0..RN {
        for i in 0..RM {
            out[j][i] = hsum(acc[j][i]) + dot_f32(cols[j].offsets, &rows[i].sums);
        }
    }
    out
}

/// Rows taken together by a tile, and columns per tile with that many rows; one to three
/// rows (requests decoding) go with four columns, without `columns`' pass.
const ROWS: usize = 4;
const COLS_BY_ROWS: usize = 2;
const COLS_BY_ONE: usize = 4;

/// Columns converted at a time: their scales and offsets stay in the first cache level.
const COLUMN_GROUP: usize = 64;

/// Columns `first..` (as many as `out` holds, `m` results each, column-major), a group
/// at a time.
#[inline(always)]
fn columns<W: WeightBlock, A: ByteBlock, const DOT: u8>(
    weights: &[W],
    k_blocks: usize,
    rows: &[Row<A>],
    first: usize,
    out: &mut [f32],
) {
    let m = rows.len();
    let count = out.len() / m;
    let mut scales = Vec::with_capacity(COLUMN_GROUP.min(count) * k_blocks);
    let mut offsets = Vec::with_capacity(scales.capacity());
    for g in (0..count).step_by(COLUMN_GROUP) {
        let group = COLUMN_GROUP.min(count - g);
        let blocks = &weights[(first + g) * k_blocks..(first + g + group) * k_blocks];
        scales.clear();
        scales.extend(blocks.iter().map(|b| b.scale()));
        offsets.clear();
        offsets.extend(blocks.iter().map(|b| b.offset()));
        let cols: Vec<Column<W>> = (0..group)
            .map(|c| {
                let r = c * k_blocks..(c + 1) * k_blocks;
                Column { blocks: &blocks[r.clone()], scales: &scales[r.clone()], offsets: &offsets[r] }
            })
            .collect();
        group_of_columns::<W, A, DOT>(&cols, rows, &mut out[g * m..(g + group) * m]);
    }
}

/// Every row through these columns, in tiles.
#[inline(always)]
fn group_of_columns<W: WeightBlock, A: ByteBlock, const DOT: u8>(cols: &[Column<W>], rows: &[Row<A>], out: &mut [f32]) {
    let (m, count) = (rows.len(), cols.len());
    let full = m - m % ROWS;
    for i in (0..full).step_by(ROWS) {
        let r = [&rows[i], &rows[i + 1], &rows[i + 2], &rows[i + 3]];
        let mut c = 0;
        while c + COLS_BY_ROWS <= count {
            let t = unsafe { tile::<W, A, COLS_BY_ROWS, ROWS, DOT>([&cols[c], &cols[c + 1]], r) };
            for (j, t) in t.iter().enumerate() {
                out[(c + j) * m + i..(c + j) * m + i + ROWS].copy_from_slice(t);
            }
            c += COLS_BY_ROWS;
        }
        for c in c..count {
            let [t] = unsafe { tile::<W, A, 1, ROWS, DOT>([&cols[c]], r) };
            out[c * m + i..c * m + i + ROWS].copy_from_slice(&t);
        }
    }
    for i in full..m {
        let r = [&rows[i]];
        let mut c = 0;
        while c + COLS_BY_ONE <= count {
            let t = unsafe { tile::<W, A, COLS_BY_ONE, 1, DOT>([&cols[c], &cols[c + 1], &cols[c + 2], &cols[c + 3]], r) };
            for (j, [t]) in t.iter().enumerate() {
                out[(c + j) * m + i] = *t;
            }
            c += COLS_BY_ONE;
        }
        for c in c..count {
            let [[t]] = unsafe { tile::<W, A, 1, 1, DOT>([&cols[c]], r) };
            out[c * m + i] = t;
        }
    }
}

/// `RN` weight columns dotted with one input row, each column's scales and offsets read
/// from its blocks where they are used. `columns` converts them in a pass of their own,
/// which several rows share; for one row (decoding) that pass read every block twice.
/// The arithmetic, and so every bit of the result, is `tile::<RN, 1>`'s. Safety: every
/// column holds as many blocks as the row (`one_row_columns` slices them `k_blocks` long).
#[inline(always)]
unsafe fn one_row_tile<W: WeightBlock, A: ByteBlock, const RN: usize, const DOT: u8>(
    cols: [&[W]; RN],
    row: &Row<A>,
) -> [f32; RN] {
    let mut acc = [_mm256_setzero_ps(); RN];
    let blocks = row.blocks.len();
    for b in 0..blocks {
        let q = _mm256_loadu_si256(row.blocks.get_unchecked(b).bytes() as *const __m256i);
        let da = _mm256_broadcast_ss(row.scales.get_unchecked(b));
        for j in 0..RN {
            let block = cols[j].get_unchecked(b);
            let dot = block_dot::<DOT>(block.unsigned(), q);
            let scale = _mm256_mul_ps(_mm256_set1_ps(block.scale()), da);
            acc[j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc[j]);
        }
    }
    let mut out = [0f32; RN];
    for j in 0..RN {
        // `dot_f32(offsets, sums)`, the offsets read from the blocks eight at a time.
        let (col, sums) = (cols[j], &row.sums);
        let mut off = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= blocks {
            let offsets: [f32; 8] = std::array::from_fn(|l| col.get_unchecked(i + l).offset());
            off = _mm256_fmadd_ps(_mm256_loadu_ps(offsets.as_ptr()), _mm256_loadu_ps(sums.as_ptr().add(i)), off);
            i += 8;
        }
        let mut sum = hsum(off);
        while i < blocks {
            sum += col[i].offset() * sums[i];
            i += 1;
        }
        out[j] = hsum(acc[j]) + sum;
    }
    out
}

/// One row through columns `first..` (as many as `out` holds), four at a time.
#[inline(always)]
fn one_row_columns<W: WeightBlock, A: ByteBlock, const DOT: u8>(
    weights: &[W],
    k_blocks: usize,
    row: &Row<A>,
    first: usize,
    out: &mut [f32],
) {
    let column = |c: usize| &weights[(first + c) * k_blocks..(first + c + 1) * k_blocks];
    let mut c = 0;
    while c + COLS_BY_ONE <= out.len() {
        let cols = [column(c), column(c + 1), column(c + 2), column(c + 3)];
        out[c..c + COLS_BY_ONE].copy_from_slice(&unsafe { one_row_tile::<W, A, COLS_BY_ONE, DOT>(cols, row) });
        c += COLS_BY_ONE;
    }
    for c in c..out.len() {
        let [t] = unsafe { one_row_tile::<W, A, 1, DOT>([column(c)], row) };
        out[c] = t;
    }
}

/// `one_row_tile` for `RM` rows (two or three requests decoding together): each column's
/// nibbles unpacked once for the rows, its scales and offsets read from its blocks. The
/// arithmetic, and so every bit of the result, is `tile::<RN, RM>`'s.
/// Safety: every column holds as many blocks as the rows (`direct_columns` slices them
/// `k_blocks` long).
#[inline(always)]
unsafe fn direct_tile<W: WeightBlock, A: ByteBlock, const RN: usize, const RM: usize, const DOT: u8>(
    cols: [&[W]; RN],
    rows: [&Row<A>; RM],
) -> [[f32; RM]; RN] {
    let mut acc = [[_mm256_setzero_ps(); RM]; RN];
    let blocks = rows[0].blocks.len();
    for b in 0..blocks {
        let mut nib = [_mm256_setzero_si256(); RN];
        let mut d = [0f32; RN];
        for j in 0..RN {
            let block = cols[j].get_unchecked(b);
            nib[j] = block.unsigned();
            d[j] = block.scale();
        }
        for i in 0..RM {
            let q = _mm256_loadu_si256(rows[i].blocks.get_unchecked(b).bytes() as *const __m256i);
            let da = _mm256_broadcast_ss(rows[i].scales.get_unchecked(b));
            for j in 0..RN {
                let dot = block_dot::<DOT>(nib[j], q);
                let scale = _mm256_mul_ps(_mm256_set1_ps(d[j]), da);
                acc[j][i] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc[j][i]);
            }
        }
    }
    let mut out = [[0f32; RM]; RN];
    for j in 0..RN {
        // `dot_f32(offsets, sums)` for each row, the offsets read from the blocks eight at
        // a time.
        let col = cols[j];
        let mut off = [_mm256_setzero_ps(); RM];
        let mut i = 0;
        while i + 8 <= blocks {
            let offsets: [f32; 8] = std::array::from_fn(|l| col.get_unchecked(i + l).offset());
            let offsets = _mm256_loadu_ps(offsets.as_ptr());
            for r in 0..RM {
                off[r] = _mm256_fmadd_ps(offsets, _mm256_loadu_ps(rows[r].sums.as_ptr().add(i)), off[r]);
            }
            i += 8;
        }
        for r in 0..RM {
            let mut sum = hsum(off[r]);
            for t in i..blocks {
                sum += col[t].offset() * rows[r].sums[t];
            }
            out[j][r] = hsum(acc[j][r]) + sum;
        }
    }
    out
}

/// Two or three rows through columns `first..` (as many as `out` holds, `m` results each,
/// column-major): four columns at a time, the rows in pairs, then one.
#[inline(always)]
fn direct_columns<W: WeightBlock, A: ByteBlock, const DOT: u8>(
    weights: &[W],
    k_blocks: usize,
    rows: &[Row<A>],
    first: usize,
    out: &mut [f32],
) {
    let m = rows.len();
    let count = out.len() / m;
    let column = |c: usize| &weights[(first + c) * k_blocks..(first + c + 1) * k_blocks];
    let mut i = 0;
    while i < m {
        let pair = i + 2 <= m;
        let mut c = 0;
        while c + COLS_BY_ONE <= count {
            let cols = [column(c), column(c + 1), column(c + 2), column(c + 3)];
            if pair {
                let t = unsafe { direct_tile::<W, A, COLS_BY_ONE, 2, DOT>(cols, [&rows[i], &rows[i + 1]]) };
                for (j, t) in t.iter().enumerate() {
                    out[(c + j) * m + i..(c + j) * m + i + 2].copy_from_slice(t);
                }
            } else {
                let t = unsafe { direct_tile::<W, A, COLS_BY_ONE, 1, DOT>(cols, [&rows[i]]) };
                for (j, [t]) in t.iter().enumerate() {
                    out[(c + j) * m + i] = *t;
                }
            }
            c += COLS_BY_ONE;
        }
        for c in c..count {
            if pair {
                let [t] = unsafe { direct_tile::<W, A, 1, 2, DOT>([column(c)], [&rows[i], &rows[i + 1]]) };
                out[c * m + i..c * m + i + 2].copy_from_slice(&t);
            } else {
                let [[t]] = unsafe { direct_tile::<W, A, 1, 1, DOT>([column(c)], [&rows[i]]) };
                out[c * m + i] = t;
            }
        }
        i += if pair { 2 } else { 1 };
    }
}

/// The product's settings, read from the environment once, so that benchmarks compare
/// them in one run (each setting in a process of its own).
pub(crate) struct Settings {
    /// `CANDLE_MATMUL_TILES=0`: 4-bit weights as before the tiles (`vec_dot`).
    pub(crate) tiles: bool,
    /// `CANDLE_MATMUL_TILES=grouped`: one to three rows through `columns` too, as before
    /// `one_row_tile` and `direct_tile`.
    grouped: bool,
    /// The block dot product: VNNI where the CPU has it, unless `CANDLE_MATMUL_VNNI=0`.
    dot: u8,
}

impl Settings {
    /// Whether weights of kind `W` go through the tiles.
    pub(crate) fn takes<W: WeightBlock>(&self) -> bool {
        self.tiles && (!W::NEEDS_VNNI || self.dot != AVX2)
    }
}

pub(crate) fn settings() -> &'static Settings {
    static SETTINGS: std::sync::OnceLock<Settings> = std::sync::OnceLock::new();
    SETTINGS.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let tiles = var("CANDLE_MATMUL_TILES");
        let vnni = var("CANDLE_MATMUL_VNNI").is_none_or(|v| v != "0");
        let dot = if vnni && std::arch::is_x86_feature_detected!("avxvnni") {
            AVX_VNNI
        } else if vnni
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            AVX512_VNNI
        } else {
            AVX2
        };
        Settings {
            tiles: tiles.as_deref() != Some("0"),
            grouped: tiles.as_deref() == Some("grouped"),
            dot,
        }
    })
}

/// Which kernel a task runs.
#[derive(Clone, Copy)]
enum Path {
    /// One row (decoding one request): `dst` itself, a stretch of columns.
    OneRow,
    /// Two or three rows: column-major, the rows in pairs.
    Direct,
    /// Any number of rows, through the pass that converts a group's scales first.
    Grouped,
}

/// One task's columns `first..` through the kernel of `path`, its block dot product
/// compiled for `DOT`.
#[inline(always)]
fn task<W: WeightBlock, A: ByteBlock, const DOT: u8>(
    path: Path,
    weights: &[W],
    k_blocks: usize,
    rows: &[Row<A>],
    first: usize,
    out: &mut [f32],
) {
    match path {
        Path::OneRow => one_row_columns::<W, A, DOT>(weights, k_blocks, &rows[0], first, out),
        Path::Direct => direct_columns::<W, A, DOT>(weights, k_blocks, rows, first, out),
        Path::Grouped => columns::<W, A, DOT>(weights, k_blocks, rows, first, out),
    }
}

/// `task`, compiled with the instruction set of `dot` enabled. Safety: `dot` is what
/// `settings` detected on this CPU.
unsafe fn task_for<W: WeightBlock, A: ByteBlock>(
    dot: u8,
    path: Path,
    weights: &[W],
    k_blocks: usize,
    rows: &[Row<A>],
    first: usize,
    out: &mut [f32],
) {
    #[target_feature(enable = "avxvnni")]
    unsafe fn avx_vnni<W: WeightBlock, A: ByteBlock>(p: Path, w: &[W], kb: usize, r: &[Row<A>], f: usize, o: &mut [f32]) {
        task::<W, A, AVX_VNNI>(p, w, kb, r, f, o)
    }
    #[target_feature(enable = "avx512vnni,avx512vl")]
    unsafe fn avx512_vnni<W: WeightBlock, A: ByteBlock>(p: Path, w: &[W], kb: usize, r: &[Row<A>], f: usize, o: &mut [f32]) {
        task::<W, A, AVX512_VNNI>(p, w, kb, r, f, o)
    }
    match dot {
        AVX_VNNI => avx_vnni(path, weights, k_blocks, rows, first, out),
        AVX512_VNNI => avx512_vnni(path, weights, k_blocks, rows, first, out),
        _ => task::<W, A, AVX2>(path, weights, k_blocks, rows, first, out),
    }
}

/// `dst[m][n] = lhs[m][k] . rhs_t[n][k]^T`, the input already quantised (`lhs_b`, `m`
/// rows of `k_blocks`); the weights' columns are split among the threads.
pub(crate) fn matmul<W: WeightBlock, A: ByteBlock>(
    (m, n, k_blocks): (usize, usize, usize),
    lhs_b: &[A],
    rhs_t: &[W],
    dst: &mut [f32],
) {
    let rows: Vec<Row<A>> = lhs_b
        .chunks_exact(k_blocks)
        .take(m)
        .map(|blocks| Row {
            blocks,
            scales: blocks.iter().map(|b| b.scale()).collect(),
            sums: blocks.iter().map(|b| b.scaled_sum()).collect(),
        })
        .collect();
    // About 64k block products a task, at least two tasks a thread when there is work for
    // them: the pool is woken once per product, and the last task decides when it ends.
    let threads = rayon::current_num_threads().max(1);
    let by_work = (65_536 / (m * k_blocks).max(1)).max(1);
    let by_threads = n.div_ceil(2 * threads).max(1);
    let per_task = by_work.min(by_threads).next_multiple_of(COLS_BY_ONE);
    assert!(settings().takes::<W>(), "weights this kernel cannot take on this CPU");
    let Settings { grouped, dot, .. } = *settings();
    let path = match m {
        1 if !grouped => Path::OneRow,
        _ if m < ROWS && !grouped => Path::Direct,
        _ => Path::Grouped,
    };
    // Safety (`task_for`): `dot` comes from `settings`.
    if let Path::OneRow = path {
        dst[..n].par_chunks_mut(per_task).enumerate().for_each(|(t, out)| unsafe {
            task_for(dot, path, rhs_t, k_blocks, &rows, t * per_task, out);
        });
        return;
    }
    let mut dst_t = vec![0f32; n * m];
    dst_t.par_chunks_mut(per_task * m).enumerate().for_each(|(t, out)| unsafe {
        task_for(dot, path, rhs_t, k_blocks, &rows, t * per_task, out);
    });
    for (row_idx, dst_row) in dst.chunks_exact_mut(n).take(m).enumerate() {
        for (col_idx, dst) in dst_row.iter_mut().enumerate() {
            *dst = dst_t[col_idx * m + row_idx];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::k_quants::GgmlType;
    use super::*;

    fn quantised<T: GgmlType>(values: &[f32]) -> Vec<T> {
        let mut out = vec![T::zeros(); values.len() / T::BLCK_SIZE];
        T::from_float(values, &mut out);
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Every shape of tile (rows in fours and one by one, columns in twos, fours and one
    /// by one) against `vec_dot` pair by pair.
    fn agrees_with_vec_dot<W: GgmlType + WeightBlock>()
    where
        W::VecDotType: ByteBlock,
    {
        let k = 96;
        let kb = k / 32;
        for (m, n) in [(1, 1), (1, 7), (2, 5), (4, 9), (5, 3), (7, 13), (9, 40)] {
            let weights: Vec<W> = quantised(&values(n * k, 1));
            let input: Vec<W::VecDotType> = quantised(&values(m * k, 2));
            let mut dst = vec![0f32; m * n];
            matmul((m, n, kb), &input, &weights, &mut dst);
            for i in 0..m {
                for j in 0..n {
                    let want = W::vec_dot(k, &weights[j * kb..(j + 1) * kb], &input[i * kb..(i + 1) * kb]);
                    let got = dst[i * n + j];
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{m}x{n}: row {i}, column {j}: {got} against {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn q4_0_tiles_agree_with_vec_dot() {
        agrees_with_vec_dot::<BlockQ4_0>();
    }

    #[test]
    fn q4_1_tiles_agree_with_vec_dot() {
        agrees_with_vec_dot::<BlockQ4_1>();
    }
}
