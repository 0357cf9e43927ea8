//! What timm's `checkpoint_filter_fn`s do to a transformer's weights made
//! for another geometry, so that the same file loads into kd's model as it
//! loads into timm's (`vision_transformer.py`, `swin_transformer.py`):
//!
//! - `pos_embed` for another grid: resampled bicubically with antialiasing,
//!   the class and distillation tokens' rows kept (`resample_abs_pos_embed`);
//! - `patch_embed.proj.weight` for another patch size: FlexiViT's
//!   pseudo-inverse resize (`resample_patch_embed`), so that a patch
//!   embedded at the new size gives what the old kernel gave on the patch
//!   resized to the old size;
//! - a Swin's `relative_position_bias_table` for another window: each
//!   head's (2w-1)² table re-gridded on BEiT's geometric progression of
//!   offsets and interpolated linearly (`resize_rel_pos_bias_table`);
//! - a Swin file in the original Microsoft layout (patch merging at the end
//!   of a stage, `head.weight`, the index and mask buffers saved): renamed
//!   to timm's, the buffers dropped (kd builds them).
//!
//! Only keys whose shape differs from the model's are touched; what cannot
//! be adapted is left for the loader's mismatch report.

use std::collections::{BTreeMap, HashMap};

use tch::{Kind, Tensor};

/// Applies every adaptation to the tensors read from a file (`loaded`),
/// given the model's variables (`vars`).
pub(crate) fn adapt(loaded: &mut BTreeMap<String, Tensor>, vars: &HashMap<String, Tensor>) {
    rename_original_swin(loaded, vars);
    for (key, t) in loaded.iter_mut() {
        let Some(var) = vars.get(key) else { continue };
        let want = var.size();
        if t.size() == want {
            continue;
        }
        let adapted = if let Some(stem) = key.strip_suffix("pos_embed") {
            let prefix = 1 + i64::from(vars.contains_key(&format!("{stem}dist_token")));
            resample_pos_embed(t, &want, prefix)
        } else if key.ends_with("patch_embed.proj.weight") {
            resample_patch_embed(t, &want)
        } else if key.ends_with("relative_position_bias_table") {
            resize_rel_pos_bias_table(t, &want)
        } else {
            None
        };
        if let Some(a) = adapted {
            *t = a;
        }
    }
}

/// Microsoft's Swin checkpoints merge patches at the end of stage `i`
/// (`layers.{i}.downsample`) where timm merges at the start of stage
/// `i + 1`, name the classifier `head` rather than `head.fc`, and save the
/// relative position index and shift masks, which timm and kd rebuild.
fn rename_original_swin(loaded: &mut BTreeMap<String, Tensor>, vars: &HashMap<String, Tensor>) {
    let original = loaded.contains_key("layers.0.downsample.reduction.weight")
        && !vars.contains_key("layers.0.downsample.reduction.weight")
        && vars.contains_key("layers.1.downsample.reduction.weight");
    let buffer = |k: &str| {
        !vars.contains_key(k)
            && (k.ends_with("relative_position_index") || k.ends_with("attn_mask"))
    };
    loaded.retain(|k, _| !buffer(k));
    if !original {
        return;
    }
    let old = std::mem::take(loaded);
    for (key, t) in old {
        let key = match key.strip_prefix("layers.").and_then(|r| r.split_once('.')) {
            Some((i, rest)) if rest.starts_with("downsample.") => match i.parse::<usize>() {
                Ok(i) => format!("layers.{}.{rest}", i + 1),
                Err(_) => key,
            },
            _ => match key.strip_prefix("head.") {
                Some(rest) if !rest.starts_with("fc.") => format!("head.fc.{rest}"),
                _ => key,
            },
        };
        loaded.insert(key, t);
    }
}

/// `[1, prefix + N, D]` for another square grid, as timm's
/// `resample_abs_pos_embed`. `None` when either is not such a grid.
pub(crate) fn resample_pos_embed(file: &Tensor, want: &[i64], prefix: i64) -> Option<Tensor> {
    let have = file.size();
    if have.len() != 3 || want.len() != 3 || have[0] != 1 || have[2] != want[2] {
        return None;
    }
    let side = |n: i64| {
        let s = ((n - prefix).max(0) as f64).sqrt().round() as i64;
        (s > 0 && s * s == n - prefix).then_some(s)
    };
    let (old, new) = (side(have[1])?, side(want[1])?);
    let d = have[2];
    let grid = file
        .narrow(1, prefix, old * old)
        .to_kind(Kind::Float)
        .reshape([1, old, old, d])
        .permute([0, 3, 1, 2])
        .internal_upsample_bicubic2d_aa([new, new], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([1, new * new, d])
        .to_kind(file.kind());
    Some(Tensor::cat(&[file.narrow(1, 0, prefix), grid], 1))
}

/// A `[O, I, h, w]` patch projection for a `want`-sized patch: with `R`
/// the bicubic (antialiased) resize from the old patch to the new one as a
/// matrix, the new kernel is the old one times `pinv(R)`, computed in fp32
/// as timm does.
fn resample_patch_embed(file: &Tensor, want: &[i64]) -> Option<Tensor> {
    let have = file.size();
    if have.len() != 4 || want.len() != 4 || have[..2] != want[..2] {
        return None;
    }
    let (oh, ow, nh, nw) = (have[2], have[3], want[2], want[3]);
    let basis = Tensor::eye(oh * ow, (Kind::Float, file.device())).reshape([oh * ow, 1, oh, ow]);
    let resize = basis
        .internal_upsample_bicubic2d_aa([nh, nw], false, None, None)
        .reshape([oh * ow, nh * nw])
        .transpose(0, 1); // [new, old]
    let pinv = resize.linalg_pinv_atol_rtol_float(None, None, false); // [old, new]
    Some(
        file.to_kind(Kind::Float)
            .reshape([have[0], have[1], oh * ow])
            .matmul(&pinv)
            .reshape([have[0], have[1], nh, nw])
            .to_kind(file.kind()),
    )
}

/// A flat `[(2w-1)², heads]` Swin bias table for another window, as timm's
/// `resize_rel_pos_bias_table` without scipy: the source offsets are
/// spread on a geometric progression (ratio found by bisection so that
/// they reach the target's extent when growing; ~1.01 when shrinking) and
/// each head's table is interpolated linearly at the integer target
/// offsets, clamped at the edges.
fn resize_rel_pos_bias_table(file: &Tensor, want: &[i64]) -> Option<Tensor> {
    let have = file.size();
    if have.len() != 2 || want.len() != 2 || have[1] != want[1] {
        return None;
    }
    let side = |n: i64| {
        let s = (n as f64).sqrt().round() as i64;
        (s * s == n && s % 2 == 1).then_some(s)
    };
    let (src, dst) = (side(have[0])?, side(want[0])?);
    let heads = have[1] as usize;
    let points = progression(src, dst);
    let half = (dst / 2) as f64;
    let targets: Vec<f64> = (0..dst).map(|i| i as f64 - half).collect();
    let table: Vec<f32> = file
        .to_kind(Kind::Float)
        .contiguous()
        .view(-1)
        .try_into()
        .ok()?;
    let (src, dst) = (src as usize, dst as usize);
    let mut out = vec![0f32; dst * dst * heads];
    // Square windows: the rows and the columns bracket the same offsets.
    let at: Vec<_> = targets.iter().map(|&t| bracket(&points, t)).collect();
    for (i, &(y, wy)) in at.iter().enumerate() {
        for (j, &(x, wx)) in at.iter().enumerate() {
            for h in 0..heads {
                let v = |r: usize, c: usize| f64::from(table[(r * src + c) * heads + h]);
                let sum = v(y.0, x.0) * wy.0 * wx.0
                    + v(y.0, x.1) * wy.0 * wx.1
                    + v(y.1, x.0) * wy.1 * wx.0
                    + v(y.1, x.1) * wy.1 * wx.1;
                out[(i * dst + j) * heads + h] = sum as f32;
            }
        }
    }
    Some(
        Tensor::from_slice(&out)
            .reshape([(dst * dst) as i64, heads as i64])
            .to_kind(file.kind())
            .to_device(file.device()),
    )
}

/// The `src` source offsets: 0, then ±(1, 1 + q, 1 + q + q², ...), with
/// `q` bisected in [1.01, 1.5] so that the progression's `src / 2` terms
/// just pass `dst / 2` (the midpoint of the last step, as timm's loop
/// leaves it).
fn progression(src: i64, dst: i64) -> Vec<f64> {
    let n = src / 2;
    let sum = |q: f64| (1.0 - q.powi(n as i32)) / (1.0 - q);
    let (mut left, mut right, mut q) = (1.01f64, 1.5f64, 1.01f64);
    while right - left > 1e-6 {
        q = (left + right) / 2.0;
        if sum(q) > (dst / 2) as f64 {
            right = q;
        } else {
            left = q;
        }
    }
    let mut dis = Vec::with_capacity(n as usize);
    let mut cur = 1.0;
    for i in 0..n {
        dis.push(cur);
        cur += q.powi(i as i32 + 1);
    }
    dis.iter()
        .rev()
        .map(|d| -d)
        .chain([0.0])
        .chain(dis.iter().copied())
        .collect()
}

/// The two grid points around `x` and their linear weights (the weight of
/// the left point is the distance to the right one); beyond either end,
/// the end point alone.
fn bracket(points: &[f64], x: f64) -> ((usize, usize), (f64, f64)) {
    let last = points.len() - 1;
    let right = points.partition_point(|&p| p < x).min(last);
    let left = right.saturating_sub(1);
    let mut dl = (x - points[left]).max(0.0);
    let mut dr = (points[right] - x).max(0.0);
    if dl == 0.0 && dr == 0.0 {
        (dl, dr) = (1.0, 1.0);
    }
    ((left, right), (dr / (dl + dr), dl / (dl + dr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progression_spans_the_target_when_growing_and_hugs_unit_steps_when_shrinking() {
        let grow = progression(13, 15);
        assert_eq!(grow.len(), 13);
        assert!((grow[12] - 7.0).abs() < 1e-3, "{grow:?}");
        let shrink = progression(13, 7);
        assert!(
            (shrink[7] - 1.0).abs() < 1e-12 && (shrink[8] - 2.01).abs() < 1e-5,
            "{shrink:?}"
        );
    }

    #[test]
    fn the_same_window_size_reads_the_table_back() {
        let t = Tensor::randn([49, 3], tch::kind::FLOAT_CPU);
        // 7×7 source to a 7×7 target: offsets 0, ±1, ±2.01...: only the
        // centre three rows and columns sit on grid points.
        let r = resize_rel_pos_bias_table(&t, &[49, 3]).unwrap();
        let (t, r) = (t.reshape([7, 7, 3]), r.reshape([7, 7, 3]));
        let centre = |x: &Tensor| x.narrow(0, 2, 3).narrow(1, 2, 3);
        assert!(centre(&t).allclose(&centre(&r), 1e-6, 1e-6, false));
    }

    /// FlexiViT's defining property: the new kernel on the patch resized
    /// to the new size gives what the old kernel gave on the old patch (one
    /// patch: resizing a whole image mixes neighbouring patches).
    #[test]
    fn a_resampled_patch_kernel_sees_a_resized_patch_as_the_old_one_saw_the_patch() {
        let w = Tensor::randn([4, 3, 4, 4], tch::kind::FLOAT_CPU);
        let x = Tensor::randn([5, 3, 4, 4], tch::kind::FLOAT_CPU);
        let up = resample_patch_embed(&w, &[4, 3, 8, 8]).unwrap();
        let x_up = x.internal_upsample_bicubic2d_aa([8, 8], false, None, None);
        let old = x.conv2d(&w, None::<Tensor>, [4, 4], [0, 0], [1, 1], 1);
        let new = x_up.conv2d(&up, None::<Tensor>, [8, 8], [0, 0], [1, 1], 1);
        assert!(
            new.allclose(&old, 1e-4, 1e-4, false),
            "{}",
            (new - old).abs().max()
        );
    }
}
