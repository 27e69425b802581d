//! Throughput of the projection kernels on E2B-sized matrices, for each weight format:
//! decode (one row, GB/s of weights streamed) and prefill (128 rows, GFLOP/s), through
//! `Linear::forward` (what the model runs) and through candle: its `QMatMul` on the same
//! blocks, or for f32/bf16 the weight as a plain tensor (candle's GEMM for prefill).
//!
//! `cargo run --release -p gemma4 --example kernels [-- --threads N] [--in-cache] [--batch N] [--only q6_k,bf16]`
//!
//! `--batch N` (default 8) also times the small-batch path: N rows through the decode
//! kernels, as N sequences decoding together (GFLOP/s, and how much longer than one row).
//!
//! `--in-cache` runs a few small matrices that stay in the L3 cache, which shows each
//! kernel's compute ceiling (a decode kernel slower there than the DRAM bandwidth is
//! compute-bound).

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use gemma4::nn::linear::{Linear, LinearWeight};
use gemma4::quant::{quantize, QuantType};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n: usize = args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--threads N"))?
            .parse()?;
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    let batch: usize = match args.iter().position(|a| a == "--batch") {
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--batch N"))?
            .parse()?,
        None => 8,
    };
    // `--only q6_k,bf16`: just those formats.
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect());
    let dev = Device::Cpu;
    // Enough matrices that one pass is far larger than the caches (~0.9 GB of f32), or
    // with --in-cache a few with 1/16 of the rows (~2.4 MB of bf16).
    let in_cache = args.iter().any(|a| a == "--in-cache");
    let (div, count) = if in_cache { (16, 3) } else { (1, 24) };
    let shapes = [
        (6144 / div, 1536usize),
        (1536 / div, 6144),
        (2048 / div, 1536),
    ];
    let dense: Vec<Tensor> = (0..count)
        .map(|c| Tensor::randn(0f32, 0.02, shapes[c % shapes.len()], &dev))
        .collect::<candle_core::Result<_>>()?;
    println!(
        "format  path    decode GB/s  batch-{batch} GFLOP/s (time ×1 row)  prefill GFLOP/s   (medians)"
    );
    // Dense formats (None: f32, then bf16) and the quantized ones.
    let formats = [Err(DType::F32), Err(DType::BF16)]
        .into_iter()
        .chain(QuantType::ALL.into_iter().map(Ok));
    for q in formats {
        let name = match q {
            Err(DType::F32) => "f32",
            Err(_) => "bf16",
            Ok(q) => q.name(),
        };
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == name)) {
            continue;
        }
        let mut linears = Vec::new();
        let mut plain = Vec::new();
        let mut qtensors: Vec<Arc<QTensor>> = Vec::new();
        for w in &dense {
            linears.push(match q {
                Err(dtype) => {
                    let w = w.to_dtype(dtype)?;
                    plain.push(Linear::from_linear_weight(LinearWeight::plain(w.clone())));
                    Linear::from_linear_weight(LinearWeight::dense(w)?)
                }
                Ok(q) => {
                    let qt = Arc::new(quantize(w, q)?);
                    qtensors.push(qt.clone());
                    Linear::from_linear_weight(LinearWeight::quantized(qt)?)
                }
            });
        }
        let bytes: usize = linears.iter().map(|l| l.weight().size_in_bytes()).sum();
        let flops: f64 = dense
            .iter()
            .map(|w| 2.0 * 128.0 * w.elem_count() as f64)
            .sum();
        // "candle": candle's quantized matmul on the same blocks, or the dense weight
        // as a plain tensor (candle's GEMM for prefill).
        let paths = ["gemma4", "candle"];
        for path in paths {
            let run = |m: usize, passes: usize| -> anyhow::Result<f64> {
                let mut times = Vec::new();
                for _ in 0..passes + 1 {
                    let t = Instant::now();
                    for (i, l) in linears.iter().enumerate() {
                        let x = Tensor::ones((1, m, dense[i].dim(1)?), l.dtype(), &dev)?;
                        let y = match (path, q) {
                            ("candle", Ok(_)) => {
                                QMatMul::QTensor(qtensors[i].clone()).forward(&x)?
                            }
                            ("candle", Err(_)) => plain[i].forward(&x)?,
                            _ => l.forward(&x)?,
                        };
                        std::hint::black_box(y);
                    }
                    times.push(t.elapsed().as_secs_f64());
                }
                times.remove(0);
                times.sort_by(|a, b| a.total_cmp(b));
                Ok(times[times.len() / 2])
            };
            let one = run(1, 31 * div)?;
            let decode = bytes as f64 / one / 1e9;
            let many = run(batch, 15 * div)?;
            let small = flops / 128.0 * batch as f64 / many / 1e9;
            let prefill = flops / run(128, 3)? / 1e9;
            println!(
                "{name:6}  {path:6}  {decode:11.1}  {small:16.1} ({:4.2})  {prefill:15.1}",
                many / one
            );
        }
    }
    Ok(())
}
