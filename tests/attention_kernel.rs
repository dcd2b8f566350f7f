//! llama.cpp's CPU flash attention, as hearth builds it (patches/): a step
//! of 1 to 63 query rows (a decoding step, drafted tokens being verified)
//! runs the kernel that stacks the rows of every query head of one KV head
//! into one tile and splits the KV into chunks of fixed cells. Each case is
//! checked against attention computed here in f64 from the same
//! (f16-rounded) keys and values, over the shapes that reach it: query
//! heads per KV head 1, 3 and 4, 1 to 63 rows, KV lengths that are and are
//! not whole tiles or chunks, masks that hide whole tiles, single cells and
//! whole rows, ALiBi slopes, a logit soft cap and attention sinks, on 1 to
//! 4 threads; rows of two sequences (the per-row kernel) and 64 rows or
//! more (the prefill kernel) the same way. And a row's result is the same
//! to the bit alone as among drafts, on any number of threads and beside
//! a longer KV: what makes greedy replies with speculation equal those
//! without.

mod common;

use common::rng::Rng;
use llama_cpp_sys_2 as sys;

#[derive(Debug, Clone, Copy)]
struct Case {
    rows: usize,
    heads: usize,
    kv_heads: usize,
    n_kv: usize,
    max_bias: f32,
    softcap: f32,
    sinks: bool,
    split: bool,
    threads: i32,
}

fn f16(x: f32) -> u16 {
    // SAFETY: a pure conversion of one value.
    unsafe { sys::ggml_fp32_to_fp16(x) }
}

fn f32_of(x: u16) -> f32 {
    // SAFETY: a pure conversion of one value.
    unsafe { sys::ggml_fp16_to_fp32(x) }
}

/// The mask of row `r` at cell `j`: every row hides the second whole tile
/// (64..128) and a scatter of single cells, and every third row the cells
/// past its own causal end. With `split` (two sequences side by side in
/// one KV), rows 4k and 4k + 3 see only the first and the second half of
/// the cells, and row 1 sees nothing (its output is zero).
fn masked(c: &Case, r: usize, j: usize) -> bool {
    (64..128).contains(&j)
        || (j * 7).is_multiple_of(29)
        || (r % 3 == 2 && j + c.rows > c.n_kv + r)
        || (c.split
            && ((r.is_multiple_of(4) && j >= c.n_kv / 2)
                || (r % 4 == 3 && j < c.n_kv / 2)
                || (r == 1 && c.rows > 2)))
}

/// ALiBi slope of head `h`, as ggml computes it.
fn slope(max_bias: f32, heads: usize, h: usize) -> f32 {
    if max_bias <= 0.0 {
        return 1.0;
    }
    let log2 = 1usize << (heads as f32).log2().floor() as u32;
    let m0 = 2f32.powf(-max_bias / log2 as f32);
    let m1 = 2f32.powf(-(max_bias / 2.0) / log2 as f32);
    if h < log2 {
        m0.powi(h as i32 + 1)
    } else {
        m1.powi(2 * (h - log2) as i32 + 1)
    }
}

/// ggml's flash attention of `q` (D x rows x heads) over `k` and `v` (D x
/// n_kv x kv_heads, f16) under `mask` (n_kv x rows, f16), with `sinks`
/// (one per head) if given, on `c.threads` threads.
fn attend(
    c: &Case,
    d: usize,
    q: &[f32],
    k: &[u16],
    v: &[u16],
    mask: &[u16],
    sinks: Option<&[f32]>,
) -> Vec<f32> {
    let scale = 1.0 / (d as f32).sqrt();
    let mem = 256 * 1024 * 1024;
    // SAFETY: ggml owns the context's memory (mem_buffer null); every tensor
    // is created in it with the shapes the copies below fill exactly, and the
    // context is freed once the result is read.
    unsafe {
        let ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: mem,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: false,
        });
        assert!(!ctx.is_null());
        let new = |ty, n: [usize; 3]| {
            sys::ggml_new_tensor_4d(ctx, ty, n[0] as i64, n[1] as i64, n[2] as i64, 1)
        };
        let tq = new(sys::GGML_TYPE_F32, [d, c.rows, c.heads]);
        let tk = new(sys::GGML_TYPE_F16, [d, c.n_kv, c.kv_heads]);
        let tv = new(sys::GGML_TYPE_F16, [d, c.n_kv, c.kv_heads]);
        let tm = new(sys::GGML_TYPE_F16, [c.n_kv, c.rows, 1]);
        assert_eq!(
            (q.len(), k.len(), v.len(), mask.len()),
            (
                d * c.rows * c.heads,
                d * c.n_kv * c.kv_heads,
                d * c.n_kv * c.kv_heads,
                c.n_kv * c.rows
            )
        );
        std::ptr::copy_nonoverlapping(q.as_ptr(), (*tq).data as *mut f32, q.len());
        std::ptr::copy_nonoverlapping(k.as_ptr(), (*tk).data as *mut u16, k.len());
        std::ptr::copy_nonoverlapping(v.as_ptr(), (*tv).data as *mut u16, v.len());
        std::ptr::copy_nonoverlapping(mask.as_ptr(), (*tm).data as *mut u16, mask.len());
        let fa = sys::ggml_flash_attn_ext(ctx, tq, tk, tv, tm, scale, c.max_bias, c.softcap);
        if let Some(sinks) = sinks {
            let ts = new(sys::GGML_TYPE_F32, [c.heads, 1, 1]);
            std::ptr::copy_nonoverlapping(sinks.as_ptr(), (*ts).data as *mut f32, sinks.len());
            sys::ggml_flash_attn_ext_add_sinks(fa, ts);
        }
        let graph = sys::ggml_new_graph(ctx);
        sys::ggml_build_forward_expand(graph, fa);
        let status = sys::ggml_graph_compute_with_ctx(ctx, graph, c.threads);
        assert_eq!(status, sys::GGML_STATUS_SUCCESS, "{c:?}");
        let n = d * c.heads * c.rows;
        let out = std::slice::from_raw_parts((*fa).data as *const f32, n).to_vec();
        sys::ggml_free(ctx);
        out
    }
}

/// Largest |difference| between ggml's output and the f64 reference.
fn run(c: Case) -> f64 {
    const D: usize = 64;
    let scale = 1.0 / (D as f32).sqrt();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c.rows * 131 + c.n_kv * 7 + c.heads) as u64);
    let q: Vec<f32> = (0..D * c.rows * c.heads).map(|_| rng.next()).collect();
    let k: Vec<u16> = (0..D * c.n_kv * c.kv_heads)
        .map(|_| f16(rng.next()))
        .collect();
    let v: Vec<u16> = (0..D * c.n_kv * c.kv_heads)
        .map(|_| f16(rng.next()))
        .collect();
    let mask: Vec<u16> = (0..c.rows)
        .flat_map(|r| (0..c.n_kv).map(move |j| (r, j)))
        .map(|(r, j)| {
            if masked(&c, r, j) {
                f16(f32::NEG_INFINITY)
            } else {
                f16(((j % 5) as f32 - 2.0) * 0.25)
            }
        })
        .collect();
    let sinks: Vec<f32> = (0..c.heads).map(|h| h as f32 * 0.5 - 1.0).collect();

    let out = attend(&c, D, &q, &k, &v, &mask, c.sinks.then_some(&sinks[..]));

    let group = c.heads / c.kv_heads;
    let mut worst = 0f64;
    for r in 0..c.rows {
        for h in 0..c.heads {
            let hk = h / group;
            let qr = &q[D * (r + c.rows * h)..][..D];
            let logits: Vec<f64> = (0..c.n_kv)
                .map(|j| {
                    let m = f32_of(mask[j + c.n_kv * r]) as f64;
                    if m == f64::NEG_INFINITY {
                        return m;
                    }
                    let kj = &k[D * (j + c.n_kv * hk)..][..D];
                    let dot: f64 = (0..D).map(|d| qr[d] as f64 * f32_of(kj[d]) as f64).sum();
                    let mut s = dot * scale as f64;
                    if c.softcap != 0.0 {
                        s = c.softcap as f64 * (s / c.softcap as f64).tanh();
                    }
                    s + slope(c.max_bias, c.heads, h) as f64 * m
                })
                .collect();
            let sink = if c.sinks {
                sinks[h] as f64
            } else {
                f64::NEG_INFINITY
            };
            let max = logits.iter().copied().fold(sink, f64::max);
            let weights: Vec<f64> = logits.iter().map(|&s| (s - max).exp()).collect();
            let mut sum: f64 = weights.iter().sum();
            if c.sinks {
                sum += (sink - max).exp();
            }
            for d in 0..D {
                let want = if max == f64::NEG_INFINITY {
                    0.0
                } else {
                    (0..c.n_kv)
                        .map(|j| weights[j] * f32_of(v[d + D * (j + c.n_kv * hk)]) as f64)
                        .sum::<f64>()
                        / sum
                };
                let got = out[d + D * (h + c.heads * r)] as f64;
                assert!(got.is_finite(), "{c:?}: row {r} head {h} is {got}");
                worst = worst.max((got - want).abs());
            }
        }
    }
    worst
}

fn check(c: Case) {
    let worst = run(c);
    // A wrong row, head or tile is off by the size of the values (about 0.1
    // to 1). The stacked kernel (2 to 63 rows that see nearly the same
    // cells) computes in f32 from the f16 keys and values, so it is within
    // rounding of the reference; the per-row paths round the query to f16
    // first.
    let stacked = c.rows < 64 && !c.split;
    let bound = if stacked { 1e-4 } else { 2e-3 };
    assert!(worst < bound, "{c:?}: largest difference {worst}");
}

#[test]
fn few_rows_match_attention_computed_in_f64() {
    let plain = Case {
        rows: 9,
        heads: 9,
        kv_heads: 3,
        n_kv: 300,
        max_bias: 0.0,
        softcap: 0.0,
        sinks: false,
        split: false,
        threads: 2,
    };
    for rows in [2, 3, 5, 9, 17, 33, 63] {
        for (heads, kv_heads) in [(9, 3), (4, 1), (4, 4)] {
            for n_kv in [64, 200, 1000] {
                check(Case {
                    rows,
                    heads,
                    kv_heads,
                    n_kv,
                    ..plain
                });
            }
        }
    }
    for threads in [1, 3, 4] {
        check(Case { threads, ..plain });
    }
    check(Case {
        max_bias: 8.0,
        heads: 8,
        kv_heads: 2,
        ..plain
    });
    check(Case {
        softcap: 30.0,
        ..plain
    });
    check(Case {
        sinks: true,
        ..plain
    });
    // Rows of two sequences: the per-row path, and the stacked kernel's
    // reordering where a tile reaches only some rows (a shared prefix).
    for rows in [4, 9, 17] {
        check(Case {
            rows,
            split: true,
            ..plain
        });
    }
}

#[test]
fn one_row_and_full_tiles_still_match() {
    // One row (a decoding step), over one KV chunk and several; 64 rows
    // and more: llama.cpp's own tiled prefill kernel.
    for (rows, n_kv) in [(1, 700), (1, 100), (64, 700), (70, 700)] {
        check(Case {
            rows,
            heads: 9,
            kv_heads: 3,
            n_kv,
            max_bias: 0.0,
            softcap: 0.0,
            sinks: false,
            split: false,
            threads: 2,
        });
    }
}

/// Random f16 values.
fn f16s(rng: &mut Rng, n: usize) -> Vec<u16> {
    (0..n).map(|_| f16(rng.next())).collect()
}

#[test]
fn a_rows_result_is_the_same_alone_as_among_drafts() {
    // A sequence at position `at` decodes one row, or verifies 9 rows (its
    // pending token and 8 drafts) that see the cells up to their own
    // positions. Each row's output must not depend on which step computed
    // it: not on the other rows, the threads, or the KV's length past what
    // the row sees (llama.cpp pads it, and drafts make it longer).
    const AT: usize = 1000;
    const ROWS: usize = 9;
    for (heads, kv_heads, d) in [(9, 3, 64), (4, 1, 256), (4, 4, 64)] {
        let mut rng = Rng(0x5eed ^ (heads * 31 + d) as u64);
        let long = 1280;
        let k = f16s(&mut rng, d * long * kv_heads);
        let v = f16s(&mut rng, d * long * kv_heads);
        let q: Vec<f32> = (0..d * ROWS * heads).map(|_| rng.next()).collect();
        let sinks: Vec<f32> = (0..heads).map(|h| h as f32 * 0.25 - 0.5).collect();
        let mask_of = |n_kv: usize, rows: std::ops::Range<usize>| -> Vec<u16> {
            rows.flat_map(|r| {
                (0..n_kv).map(move |j| {
                    if j <= AT + r {
                        0
                    } else {
                        f16(f32::NEG_INFINITY)
                    }
                })
            })
            .collect()
        };
        // The KV cut to its first n_kv cells (each head's cells are contiguous).
        let cut = |x: &[u16], n_kv: usize| -> Vec<u16> {
            (0..kv_heads)
                .flat_map(|h| x[d * long * h..][..d * n_kv].iter().copied())
                .collect()
        };
        // Query rows `rows`, each head's rows contiguous.
        let rows_of = |rows: std::ops::Range<usize>| -> Vec<f32> {
            (0..heads)
                .flat_map(|h| {
                    rows.clone()
                        .flat_map(move |r| (0..d).map(move |i| (h, r, i)))
                })
                .map(|(h, r, i)| q[i + d * (r + ROWS * h)])
                .collect()
        };
        let case = |rows, n_kv, threads| Case {
            rows,
            heads,
            kv_heads,
            n_kv,
            max_bias: 0.0,
            softcap: 0.0,
            sinks: true,
            split: false,
            threads,
        };
        let step = |first: usize, rows: usize, n_kv: usize, threads: i32| -> Vec<f32> {
            attend(
                &case(rows, n_kv, threads),
                d,
                &rows_of(first..first + rows),
                &cut(&k, n_kv),
                &cut(&v, n_kv),
                &mask_of(n_kv, first..first + rows),
                Some(&sinks),
            )
        };
        // Output layout: D x heads x rows.
        let row = |out: &[f32], r: usize| out[d * heads * r..][..d * heads].to_vec();
        let drafts = step(0, ROWS, long, 2);
        for r in 0..ROWS {
            for (n_kv, threads) in [(1024, 1), (1024, 2), (1280, 3), (AT + r + 1, 4)] {
                let alone = step(r, 1, n_kv, threads);
                assert!(
                    row(&drafts, r) == row(&alone, 0),
                    "heads {heads}/{kv_heads} d {d}: row {r} alone (KV {n_kv}, {threads} threads) differs from the 9-row step"
                );
            }
        }
        // The same rows in a step of 4 starting at row 3, on 3 threads.
        let mid = step(3, 4, 1024, 3);
        for r in 0..4 {
            assert!(
                row(&mid, r) == row(&drafts, 3 + r),
                "heads {heads}/{kv_heads} d {d}: row {} in a 4-row step",
                3 + r
            );
        }
    }
}
