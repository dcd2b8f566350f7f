//! llama.cpp's CPU matrix products of Q4_1, Q5_0 and Q8_0 weights, as hearth
//! builds it (patches/ggml-cpu-quant-gemm.patch): tiles of weight rows by 4
//! columns, so a weight block is loaded (and unpacked) once for every column
//! of a step (a decoding token and its drafts, or several sequences)
//! instead of once a column. Checked against a product computed here in
//! f64 from the same dequantized weights, over column counts 1 to 17 and
//! row counts that are and are not whole tiles, on 1 to 4 threads. And a
//! column's result is the same to the bit alone as among others, on any
//! number of threads: what keeps greedy replies with speculation equal to
//! those without.

mod common;

use common::rng::Rng;
use llama_cpp_sys_2 as sys;

/// The weight types the patch computes.
const TYPES: [sys::ggml_type; 3] = [
    sys::GGML_TYPE_Q4_1,
    sys::GGML_TYPE_Q5_0,
    sys::GGML_TYPE_Q8_0,
];

/// `rows` weight rows of `k` values quantized to `ty`, and the same
/// dequantized.
fn weights(ty: sys::ggml_type, rows: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let mut rng = Rng(seed);
    // Rows of different ranges and offsets, so the blocks' minimums matter.
    let w: Vec<f32> = (0..rows * k)
        .map(|i| rng.next() * (1.0 + (i / k) as f32 * 0.1) + ((i / k) % 3) as f32 * 0.5)
        .collect();
    // SAFETY: pure queries of the type's block layout.
    let row_bytes = unsafe { sys::ggml_row_size(ty, k as i64) };
    let mut q = vec![0u8; rows * row_bytes];
    let mut back = vec![0f32; rows * k];
    // SAFETY: `w` holds rows × k floats and `q` rows × row_bytes bytes, what
    // quantizing rows rows of k values reads and writes; to_float reads
    // rows × k values' blocks from `q` and writes as many floats.
    unsafe {
        let written = sys::ggml_quantize_chunk(
            ty,
            w.as_ptr(),
            q.as_mut_ptr().cast(),
            0,
            rows as i64,
            k as i64,
            std::ptr::null(),
        );
        assert_eq!(written, q.len());
        let traits = sys::ggml_get_type_traits(ty);
        let to_float = (*traits).to_float.expect("the type dequantizes");
        to_float(q.as_ptr().cast(), back.as_mut_ptr(), (rows * k) as i64);
    }
    (q, back)
}

/// ggml's product of the weights (`rows` rows of `k`, quantized to `ty`)
/// with `x` (`k` × `cols`, f32), `rows` × `cols`, on `threads` threads.
fn mul_mat(
    ty: sys::ggml_type,
    q: &[u8],
    rows: usize,
    k: usize,
    x: &[f32],
    cols: usize,
    threads: i32,
) -> Vec<f32> {
    assert_eq!(x.len(), k * cols);
    // SAFETY: ggml owns the context's memory (mem_buffer null); both inputs
    // are created in it with the shapes the copies below fill exactly, and
    // the context is freed once the result is read.
    unsafe {
        let ctx = context(64 * 1024 * 1024);
        let tw = sys::ggml_new_tensor_2d(ctx, ty, k as i64, rows as i64);
        let tx = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, k as i64, cols as i64);
        assert_eq!(sys::ggml_nbytes(tw), q.len());
        std::ptr::copy_nonoverlapping(q.as_ptr(), (*tw).data as *mut u8, q.len());
        std::ptr::copy_nonoverlapping(x.as_ptr(), (*tx).data as *mut f32, x.len());
        let out = sys::ggml_mul_mat(ctx, tw, tx);
        let graph = sys::ggml_new_graph(ctx);
        sys::ggml_build_forward_expand(graph, out);
        let status = sys::ggml_graph_compute_with_ctx(ctx, graph, threads);
        assert_eq!(status, sys::GGML_STATUS_SUCCESS);
        let r = std::slice::from_raw_parts((*out).data as *const f32, rows * cols).to_vec();
        sys::ggml_free(ctx);
        r
    }
}

/// A ggml context of `bytes` that ggml allocates (free it with ggml_free).
fn context(bytes: usize) -> *mut sys::ggml_context {
    // SAFETY: ggml allocates the context's memory itself (mem_buffer null).
    let ctx = unsafe {
        sys::ggml_init(sys::ggml_init_params {
            mem_size: bytes,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: false,
        })
    };
    assert!(!ctx.is_null());
    ctx
}

fn columns(k: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..k * cols).map(|_| rng.next() * 2.0).collect()
}

#[test]
fn the_product_matches_one_computed_in_f64() {
    for (ty, (rows, k)) in TYPES
        .into_iter()
        .flat_map(|ty| [(13, 576), (16, 1536), (1, 64), (7, 192)].map(|s| (ty, s)))
    {
        let (q, w) = weights(ty, rows, k, 0x1234 + rows as u64);
        for cols in [1, 2, 3, 4, 5, 8, 9, 13, 17] {
            let x = columns(k, cols, 0x9e37 ^ (cols * 31 + k) as u64);
            for threads in [1, 2, 3, 4] {
                let got = mul_mat(ty, &q, rows, k, &x, cols, threads);
                for c in 0..cols {
                    for r in 0..rows {
                        let (wr, xc) = (&w[r * k..(r + 1) * k], &x[c * k..(c + 1) * k]);
                        let exact: f64 =
                            wr.iter().zip(xc).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let norm = (wr.iter().map(|a| (*a as f64).powi(2)).sum::<f64>()
                            * xc.iter().map(|b| (*b as f64).powi(2)).sum::<f64>())
                        .sqrt();
                        // The columns are quantized to 8 bits: about 1/254 of
                        // each value, far from the size of a wrong block.
                        let err = (got[c * rows + r] as f64 - exact).abs();
                        assert!(
                            err <= 0.01 * norm,
                            "type {ty} rows {rows} k {k} cols {cols} threads {threads}: [{r}, {c}] {} vs {exact} (norm {norm})",
                            got[c * rows + r]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn a_columns_result_is_the_same_alone_as_among_others() {
    for ty in TYPES {
        same_alone_as_among_others(ty);
    }
}

fn same_alone_as_among_others(ty: sys::ggml_type) {
    let (rows, k) = (22, 576);
    let (q, _) = weights(ty, rows, k, 0xabcd);
    let x = columns(k, 17, 0x5151);
    let alone: Vec<Vec<u32>> = (0..17)
        .map(|c| {
            mul_mat(ty, &q, rows, k, &x[c * k..(c + 1) * k], 1, 1)
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect();
    for cols in 1..=17 {
        for threads in [1, 2, 3, 4] {
            let got = mul_mat(ty, &q, rows, k, &x[..cols * k], cols, threads);
            for (c, want) in alone.iter().enumerate().take(cols) {
                let col: Vec<u32> = got[c * rows..(c + 1) * rows]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                assert_eq!(
                    &col, want,
                    "type {ty}: column {c} of {cols} on {threads} threads"
                );
            }
        }
    }
}

/// Not a check but the kernel's timing, run by hand:
/// `cargo test --release --test matmul_kernel -- --ignored --nocapture
/// --test-threads=1` (and again with `HEARTH_QUANT_GEMM=off` for the stock
/// products). For a step of 1 to 13 columns on 2 threads, min / median /
/// max of 9: the Q4_1 products of SmolLM2-135M's 30 layers (106M weights),
/// the Q5_0 ones of Gemma 3 270M's 18 layers (63M), and the Q8_0 output
/// layers of SmolLM2 (49,152 × 576) and Gemma 3 (262,144 × 640).
/// Weight matrices as (rows, k).
type Shapes = Vec<(usize, usize)>;

#[test]
#[ignore]
fn timing_on_model_shapes() {
    let smollm2_layers: Shapes = (0..30)
        .flat_map(|_| [(4608, 576), (576, 1536)]) // Q, K, V, output, gate, up; down
        .collect();
    let gemma_q5_0: Shapes = (0..18)
        .flat_map(|_| [(1024, 640), (256, 640), (2048, 640), (2048, 640)]) // Q, K, gate, up
        .collect();
    let shapes: [(&str, sys::ggml_type, Shapes); 4] = [
        ("SmolLM2 layers, Q4_1", sys::GGML_TYPE_Q4_1, smollm2_layers),
        (
            "SmolLM2 output, Q8_0",
            sys::GGML_TYPE_Q8_0,
            vec![(49152, 576)],
        ),
        ("Gemma 3 layers, Q5_0", sys::GGML_TYPE_Q5_0, gemma_q5_0),
        (
            "Gemma 3 output, Q8_0",
            sys::GGML_TYPE_Q8_0,
            vec![(262144, 640)],
        ),
    ];
    for (name, ty, mats) in shapes {
        for cols in [1usize, 2, 4, 8, 13] {
            let ctx = context(1536 * 1024 * 1024);
            // SAFETY: every tensor is created in `ctx` with the shapes the
            // copies fill exactly, and the context is freed after the runs.
            unsafe {
                let graph = sys::ggml_new_graph(ctx);
                for (n, &(rows, k)) in mats.iter().enumerate() {
                    let (q, _) = weights(ty, rows, k, n as u64 * 7919 + rows as u64);
                    let tw = sys::ggml_new_tensor_2d(ctx, ty, k as i64, rows as i64);
                    std::ptr::copy_nonoverlapping(q.as_ptr(), (*tw).data as *mut u8, q.len());
                    let x = columns(k, cols, n as u64);
                    let tx =
                        sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, k as i64, cols as i64);
                    std::ptr::copy_nonoverlapping(x.as_ptr(), (*tx).data as *mut f32, x.len());
                    sys::ggml_build_forward_expand(graph, sys::ggml_mul_mat(ctx, tw, tx));
                }
                let mut ms: Vec<f64> = (0..9)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        let status = sys::ggml_graph_compute_with_ctx(ctx, graph, 2);
                        assert_eq!(status, sys::GGML_STATUS_SUCCESS);
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect();
                ms.sort_by(f64::total_cmp);
                eprintln!(
                    "{name}: {cols:>2} columns: {:.1} / {:.1} / {:.1} ms",
                    ms[0], ms[4], ms[8]
                );
                sys::ggml_free(ctx);
            }
        }
    }
}
