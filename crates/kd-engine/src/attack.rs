//! The iterative targeted attack behind adversarial views (BSS, Heo et al.
//! 2019): each step pushes the images toward their attack class along the
//! normalised input gradient of `p[attack] - p[target]`, scaled by how far
//! apart the two probabilities still are, only for samples the network still
//! classifies correctly, and clamps the result.

use kd_core::AttackSpec;
use tch::{Kind, Tensor};

use kd_models::Network;

pub fn attack(
    net: &dyn Network,
    images: &Tensor,
    target: &Tensor,
    attack_class: &Tensor,
    spec: &AttackSpec,
) -> Tensor {
    let mut img = images.detach();
    for _ in 0..spec.num_steps {
        let x = img.detach().set_requires_grad(true);
        let logits = net.forward_taps(&x, false).logits;
        let score = logits.softmax(1, Kind::Float);
        let p_target = score.gather(1, &target.unsqueeze(1), false);
        let p_attack = score.gather(1, &attack_class.unsqueeze(1), false);
        let objective = (&p_attack - &p_target).sum(Kind::Float);
        let grad = Tensor::run_backward(&[&objective], &[&x], false, false).remove(0);
        let still_right = target
            .eq_tensor(&logits.argmax(1, false))
            .to_kind(Kind::Float);
        let step_alpha = (still_right * spec.step_alpha).view([-1, 1, 1, 1]);
        if step_alpha.sum(Kind::Float).double_value(&[]) == 0.0 {
            break;
        }
        let gap = (p_target - p_attack).detach().view([-1, 1, 1, 1]);
        let norm = grad
            .square()
            .sum_dim_intlist([1, 2, 3].as_slice(), true, Kind::Float)
            .sqrt();
        let step = step_alpha * (gap + spec.eps) * &grad / norm;
        img = (img + step).clamp(spec.clamp.0, spec.clamp.1).detach();
    }
    img
}

#[cfg(test)]
mod tests {
    use tch::{Device, nn};

    use super::*;

    /// The attacked images must move toward their attack class: the gap
    /// p[attack] - p[target] grows for every attacked sample.
    #[test]
    fn attacked_samples_move_toward_the_attack_class() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = kd_models::build("resnet8", &vs.root(), 10).unwrap();
        // Inside the clamp range, so only the attack moves the pixels.
        let x = (Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu)) * 0.5).clamp(-2.5, 2.5);
        let probs = |img: &Tensor| {
            tch::no_grad(|| net.forward_taps(img, false).logits.softmax(1, Kind::Float))
        };
        let p0 = probs(&x);
        // The network's own top class is "right"; attack toward the runner-up.
        let top2 = p0.topk(2, 1, true, true).1;
        let (target, attack_class) = (top2.select(1, 0), top2.select(1, 1));
        let spec = AttackSpec {
            step_alpha: 0.3,
            num_steps: 10,
            eps: 1e-4,
            clamp: (-2.5, 2.5),
        };
        let adv = attack(net.as_ref(), &x, &target, &attack_class, &spec);
        let gap = |p: &Tensor| {
            p.gather(1, &attack_class.unsqueeze(1), false)
                - p.gather(1, &target.unsqueeze(1), false)
        };
        let (before, after) = (gap(&p0), gap(&probs(&adv)));
        let (b, a): (Vec<f32>, Vec<f32>) = (
            Vec::try_from(before.flatten(0, 1)).unwrap(),
            Vec::try_from(after.flatten(0, 1)).unwrap(),
        );
        assert!(
            a.iter().zip(&b).all(|(a, b)| a > b),
            "gap before {b:?} after {a:?}"
        );
        assert!(
            adv.max().double_value(&[]) <= 2.5 && adv.min().double_value(&[]) >= -2.5,
            "clamped"
        );
        assert!(!adv.equal(&x));
    }
}
