//! `kd_aten::linear` against ATen's own `linear` (MKL's sgemm on the CPU):
//! the same values and gradients to fp32 rounding, also through a second
//! derivative, and ATen's path where oneDNN's does not apply.

use tch::{Device, Kind, Tensor};

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - b).abs().max().double_value(&[]) / scale
}

/// Forward and every gradient of `sum(linear(x) * probe)` both ways.
fn compare(x: &Tensor, w: &Tensor, b: Option<&Tensor>) {
    let run = |ours: bool| {
        let xs = x.detach().set_requires_grad(true);
        let ws = w.detach().set_requires_grad(true);
        let bs = b.map(|b| b.detach().set_requires_grad(true));
        let y = match ours {
            true => kd_aten::linear(&xs, &ws, bs.as_ref()),
            false => xs.linear(&ws, bs.as_ref()),
        };
        tch::manual_seed(7);
        let probe = Tensor::randn(y.size(), (Kind::Float, Device::Cpu));
        (&y * probe).sum(Kind::Float).backward();
        (y.detach(), xs.grad(), ws.grad(), bs.map(|b| b.grad()))
    };
    let (y, gx, gw, gb) = run(true);
    let (y0, gx0, gw0, gb0) = run(false);
    assert_eq!(y.size(), y0.size());
    for (what, a, b) in [("y", &y, &y0), ("dx", &gx, &gx0), ("dw", &gw, &gw0)] {
        let d = rel_diff(a, b);
        assert!(d < 1e-5, "{what}: relative difference {d}");
    }
    if let (Some(a), Some(b)) = (gb, gb0) {
        assert!(rel_diff(&a, &b) < 1e-5, "db");
    }
}

#[test]
fn tokens_with_and_without_bias_match_aten() {
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([8, 65, 192], opts);
    let w = Tensor::randn([576, 192], opts) * 0.05;
    let b = Tensor::randn([576], opts);
    let fits = kd_aten::onednn_linear_fits(&x, &w);
    if !fits {
        eprintln!("oneDNN fp32 matmul not available on this CPU: only ATen's path is checked");
    }
    let before = kd_aten::onednn_linear_forwards();
    compare(&x, &w, Some(&b));
    // Where it fits, the comparison above went through oneDNN, not ATen twice.
    assert_eq!(kd_aten::onednn_linear_forwards() > before, fits);
    compare(&x, &w, None);
    // A transposed (non-contiguous) input and a plain matrix.
    compare(
        &Tensor::randn([192, 130], opts).transpose(0, 1),
        &w,
        Some(&b),
    );
    compare(&Tensor::randn([64, 192], opts), &w, Some(&b));
}

#[test]
fn second_derivatives_flow_through_the_backward() {
    tch::manual_seed(1);
    let opts = (Kind::Float, Device::Cpu);
    let x0 = Tensor::randn([4, 16], opts);
    let w0 = Tensor::randn([8, 16], opts);
    let b0 = Tensor::randn([8], opts);
    // d/dw of |d(sum tanh(linear))/dx|²: needs the backward to be recorded.
    let run = |ours: bool| {
        let x = x0.detach().set_requires_grad(true);
        let w = w0.detach().set_requires_grad(true);
        let y = match ours {
            true => kd_aten::linear(&x, &w, Some(&b0)),
            false => x.linear(&w, Some(&b0)),
        };
        let gx = Tensor::run_backward(&[y.tanh().sum(Kind::Float)], &[&x], true, true);
        let penalty = gx[0].square().sum(Kind::Float);
        Tensor::run_backward(&[penalty], &[&w], false, false)[0].shallow_clone()
    };
    let d = rel_diff(&run(true), &run(false));
    assert!(d < 1e-5, "second derivative: relative difference {d}");
}

#[test]
fn autocast_and_other_dtypes_keep_atens_path() {
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([4, 16], opts);
    let w = Tensor::randn([8, 16], opts);
    assert!(!kd_aten::onednn_linear_fits(&x.to_kind(Kind::Double), &w));
    if kd_aten::cpu_bf16_supported() {
        let y = kd_aten::cpu_autocast(|| {
            assert!(!kd_aten::onednn_linear_fits(&x, &w));
            kd_aten::linear(&x, &w, None)
        });
        assert_eq!(
            y.kind(),
            Kind::BFloat16,
            "autocast's bf16 linear, not oneDNN's fp32"
        );
    }
    let y = kd_aten::linear(&x.to_kind(Kind::Double), &w.to_kind(Kind::Double), None);
    assert_eq!(y.kind(), Kind::Double);
}
