//! Weight and spectral normalisation against PyTorch's vectors: every case, in f64 and in f32.
//! Both are candle ops on every device (no fused kernel), so the `_composed` runs take the same
//! code under the forced composed path.

use candle_core::Var;
use grad_core::device::{Path, with_path};
use grad_layers::ops::{self, SpectralNormStep};
use grad_testkit::{Case, CaseError, Outputs, Precision, grads_of, run, run_as};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn var(case: &Case, name: &str, p: Precision) -> Result<Var, CaseError> {
    Ok(Var::from_tensor(&case.input(name)?.to_tensor(p.dtype())?)?)
}

fn weight_norm_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let (v, g) = (var(case, "v", p)?, var(case, "g", p)?);
    let dim = case.attr_i64("dim")?.map(isize::try_from).transpose()?;
    let w = ops::weight_norm(v.as_tensor(), g.as_tensor(), dim)?;
    let upstream = case.input("grad_output")?.to_tensor(p.dtype())?;
    let grads = grads_of(&w, &upstream, &[v.as_tensor(), g.as_tensor()])?;
    let mut out = Outputs::new();
    for (name, grad) in ["grad_v", "grad_g"].into_iter().zip(grads) {
        out.insert(name.into(), grad.ok_or("no gradient")?);
    }
    out.insert("w".into(), w);
    Ok(out)
}

fn spectral_norm_case(case: &Case, p: Precision) -> Result<Outputs, CaseError> {
    let weight = var(case, "weight", p)?;
    let (u, v) = (
        case.input("u")?.to_tensor(p.dtype())?,
        case.input("v")?.to_tensor(p.dtype())?,
    );
    let step = SpectralNormStep {
        n_power_iterations: usize::try_from(
            case.attr_i64("n_power_iterations")?
                .ok_or("n_power_iterations")?,
        )?,
        eps: case.attr_f64("eps")?.ok_or("eps")?,
        dim: isize::try_from(case.attr_i64("dim")?.ok_or("dim")?)?,
        training: case.attr_bool("training")?,
    };
    let res = ops::spectral_norm(weight.as_tensor(), &u, &v, step)?;
    let upstream = case.input("grad_output")?.to_tensor(p.dtype())?;
    let grad = grads_of(&res.w, &upstream, &[weight.as_tensor()])?
        .remove(0)
        .ok_or("no gradient")?;
    Ok(Outputs::from([
        ("w".to_string(), res.w),
        ("sigma".to_string(), res.sigma),
        ("u".to_string(), res.u),
        ("v".to_string(), res.v),
        ("grad_weight".to_string(), grad),
    ]))
}

type CaseFn = fn(&Case, Precision) -> Result<Outputs, CaseError>;

fn both_paths(op: &str, f: CaseFn) {
    for p in [Precision::F64, Precision::F32] {
        run(op, p, f).assert_all_passed();
        with_path(Path::Composed, || {
            run_as(op, &format!("{op}_composed"), p, f)
        })
        .assert_all_passed();
    }
}

#[test]
fn weight_norm_matches_pytorch() -> TestResult {
    both_paths("weight_norm", weight_norm_case);
    Ok(())
}

#[test]
fn spectral_norm_matches_pytorch() -> TestResult {
    both_paths("spectral_norm", spectral_norm_case);
    Ok(())
}
