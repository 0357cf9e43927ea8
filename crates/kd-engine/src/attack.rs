//! The iterative targeted attack behind adversarial views (BSS, Heo et al.
//! 2019): each step pushes the images toward their attack class along the
//! normalised input gradient of `p[attack] - p[target]`, scaled by how far
//! apart the two probabilities still are, only for samples the network still
//! classifies correctly, and clamps the result.

use kd_core::AttackSpec;
use tch::{Kind, Tensor};

use kd_models::Network;

pub fn attack(net: &dyn Network, images: &Tensor, target: &Tensor, attack_class: &Tensor, spec: &AttackSpec) -> Tensor {
    let mut img = images.detach();
    for _ in 0..spec.num_steps {
        let x = img.detach().set_requires_grad(true);
        let logits = net.forward_taps(&x, false).logits;
        let score = logits.softmax(1, Kind::Float);
        let p_target = score.gather(1, &target.unsqueeze(1), false);
        let p_attack = score.gather(1, &attack_class.unsqueeze(1), false);
        let objective = (&p_attack - &p_target).sum(Kind::Float);
        let grad = Tensor::run_backward(&[&objective], &[&x], false, false).remove(0);
        let still_right = target.eq_tensor(&logits.argmax(1, false)).to_kind(Kind::Float);
        let step_alpha = (still_right * spec.step_alpha).view([-1, 1, 1, 1]);
        if step_alpha.sum(Kind::Float).double_value(&[]) == 0.0 {
            break;
        }
        let gap = (p_target - p_attack).detach().view([-1, 1, 1, 1]);
        let norm = grad.square().sum_dim_intlist([1, 2, 3].as_slice(), true, Kind::Float).sqrt();
        let step = step_alpha * (gap + spec.eps) * &grad / norm;
        img = (img + step).clamp(spec.clamp.0, spec.clamp.1).detach();
    }
    img
}
