//! The adapter from a fused kernel written over float slices to candle's `CustomOp1/2/3`.
//!
//! A kernel implements [`Kernel`] once, generic over the element type: its forward over the
//! inputs' contiguous slices, and (optionally) its backward. [`Fused`] does the rest for every
//! dtype and arity: reading the CPU storages as slices, dispatching on the dtype, wrapping the
//! output in a storage of the first input's shape, and turning the backward's vectors into
//! gradient tensors shaped, placed and typed like their inputs. Errors keep their gradkit type
//! inside candle's (see [`downcast`](crate::downcast)).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::Result;
use crate::cpu::{Float, FloatFn, cpu_slice, dispatch_op, dtype_of, storage_slice};

/// The gradient a fused backward returns for one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Grad<T> {
    /// In the element type (an activation's gradient).
    Elem(Vec<T>),
    /// Accumulated in f64 (a parameter's gradient summed over many elements), converted to the
    /// input's dtype.
    F64(Vec<f64>),
}

/// A fused CPU kernel over `N` float inputs of one dtype (contiguous), whose output has the
/// first input's shape and dtype. Wrap it in [`Fused`] to apply it with candle's
/// `Tensor::apply_op1/2/3`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use gradkit::core::cpu::{Float, Fused, Grad, Kernel};
///
/// /// `y = a * b`, element-wise.
/// struct Mul;
/// impl Kernel<2> for Mul {
///     fn name(&self) -> &'static str {
///         "mul"
///     }
///     fn forward<T: Float>(&self, [a, b]: [&[T]; 2]) -> gradkit::core::Result<Vec<T>> {
///         Ok(a.iter().zip(b).map(|(a, b)| T::from_acc(a.to_acc() * b.to_acc())).collect())
///     }
///     fn backward<T: Float>(
///         &self,
///         [a, b]: [&[T]; 2],
///         g: &[T],
///     ) -> gradkit::core::Result<[Option<Grad<T>>; 2]> {
///         let times = |x: &[T]| -> Vec<T> {
///             x.iter().zip(g).map(|(x, g)| T::from_acc(x.to_acc() * g.to_acc())).collect()
///         };
///         Ok([Some(Grad::Elem(times(b))), Some(Grad::Elem(times(a)))])
///     }
/// }
/// let a = candle_core::Var::new(&[1f32, 2.0], &Device::Cpu)?;
/// let b = Tensor::new(&[3f32, 4.0], &Device::Cpu)?;
/// let y = a.apply_op2(&b, Fused(Mul))?;
/// assert_eq!(y.to_vec1::<f32>()?, [3.0, 8.0]);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(&a).map(|g| g.to_vec1::<f32>()).transpose()?, Some(vec![3.0, 4.0]));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub trait Kernel<const N: usize>: Send + Sync {
    /// The op's name, in errors and in candle's graph.
    fn name(&self) -> &'static str;

    /// The output for the inputs' element type `T`.
    ///
    /// # Errors
    /// Whatever the kernel reports.
    fn forward<T: Float>(&self, inputs: [&[T]; N]) -> Result<Vec<T>>;

    /// The gradient with respect to each input (`None` where an input gets none), given the
    /// forward's inputs and the upstream gradient `grad` (contiguous, shaped like the output).
    ///
    /// # Errors
    /// By default, candle's `BackwardNotSupported`, as candle's own `CustomOp` traits: a kernel
    /// applied with `apply_op*_no_bwd` (a backward's own kernel) needs none.
    fn backward<T: Float>(&self, inputs: [&[T]; N], grad: &[T]) -> Result<[Option<Grad<T>>; N]> {
        let _ = (inputs, grad);
        Err(candle_core::Error::BackwardNotSupported { op: self.name() }.into())
    }
}

/// A [`Kernel`] as a candle custom op (`CustomOp1`, `CustomOp2` or `CustomOp3` by its arity).
#[derive(Debug, Clone, Copy)]
pub struct Fused<K>(pub K);

/// All of the results, or the first error.
fn all<A: Copy + Default, const N: usize>(results: [Result<A>; N]) -> Result<[A; N]> {
    let mut out = [A::default(); N];
    for (o, r) in out.iter_mut().zip(results) {
        *o = r?;
    }
    Ok(out)
}

struct Forward<'a, K, const N: usize> {
    kernel: &'a K,
    inputs: [(&'a CpuStorage, &'a Layout); N],
}

impl<K: Kernel<N>, const N: usize> FloatFn for Forward<'_, K, N> {
    type Output = CpuStorage;

    fn call<T: Float>(self) -> Result<CpuStorage> {
        let inputs = all(self.inputs.map(|(s, l)| cpu_slice::<T>(s, l)))?;
        Ok(T::to_cpu_storage_owned(self.kernel.forward(inputs)?))
    }
}

struct Backward<'a, K, const N: usize> {
    kernel: &'a K,
    inputs: [&'a Tensor; N],
    grad: &'a Tensor,
}

impl<K: Kernel<N>, const N: usize> FloatFn for Backward<'_, K, N> {
    type Output = [Option<Tensor>; N];

    fn call<T: Float>(self) -> Result<[Option<Tensor>; N]> {
        let guards = self.inputs.map(Tensor::storage_and_layout);
        let inputs = all(std::array::from_fn(|i| {
            storage_slice::<T>(&guards[i].0, guards[i].1)
        }))?;
        let (gs, gl) = self.grad.storage_and_layout();
        let grads = self.kernel.backward(inputs, storage_slice::<T>(&gs, gl)?)?;
        let mut out = [const { None }; N];
        for ((o, grad), x) in out.iter_mut().zip(grads).zip(self.inputs) {
            let t = match grad {
                None => continue,
                Some(Grad::Elem(v)) => Tensor::from_vec(v, x.shape(), x.device())?,
                Some(Grad::F64(v)) => Tensor::from_vec(v, x.shape(), x.device())?,
            };
            *o = Some(t.to_dtype(x.dtype())?);
        }
        Ok(out)
    }
}

impl<K> Fused<K> {
    fn fwd<const N: usize>(
        &self,
        inputs: [(&CpuStorage, &Layout); N],
    ) -> candle_core::Result<(CpuStorage, Shape)>
    where
        K: Kernel<N>,
    {
        let Some(&(first, layout)) = inputs.first() else {
            candle_core::bail!("{}: a fused op needs an input", self.0.name())
        };
        let fwd = Forward {
            kernel: &self.0,
            inputs,
        };
        let out = dispatch_op(self.0.name(), dtype_of(first), fwd)?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd<const N: usize>(
        &self,
        inputs: [&Tensor; N],
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; N]>
    where
        K: Kernel<N>,
    {
        let grad = grad.contiguous()?;
        let bwd = Backward {
            kernel: &self.0,
            inputs,
            grad: &grad,
        };
        let Some(first) = inputs.first() else {
            candle_core::bail!("{}: a fused op needs an input", self.0.name())
        };
        dispatch_op(self.0.name(), first.dtype(), bwd)
    }
}

impl<K: Kernel<1>> CustomOp1 for Fused<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd([(s, l)])
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [dx] = Fused::bwd(self, [x], grad)?;
        Ok(dx)
    }
}

impl<K: Kernel<2>> CustomOp2 for Fused<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd([(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [da, db] = Fused::bwd(self, [a, b], grad)?;
        Ok((da, db))
    }
}

impl<K: Kernel<3>> CustomOp3 for Fused<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd([(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = Fused::bwd(self, [a, b, c], grad)?;
        Ok((da, db, dc))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// `y = x + w`; the backward gives `x` its gradient in f64 and `w` none.
    struct AddF64;
    impl Kernel<2> for AddF64 {
        fn name(&self) -> &'static str {
            "add-f64"
        }
        fn forward<T: Float>(&self, [x, w]: [&[T]; 2]) -> Result<Vec<T>> {
            Ok(x.iter()
                .zip(w)
                .map(|(a, b)| T::from_acc(a.to_acc() + b.to_acc()))
                .collect())
        }
        fn backward<T: Float>(&self, _: [&[T]; 2], g: &[T]) -> Result<[Option<Grad<T>>; 2]> {
            Ok([
                Some(Grad::F64(g.iter().map(|v| v.as_f64()).collect())),
                None,
            ])
        }
    }

    /// A forward-only kernel.
    struct Neg;
    impl Kernel<1> for Neg {
        fn name(&self) -> &'static str {
            "neg"
        }
        fn forward<T: Float>(&self, [x]: [&[T]; 1]) -> Result<Vec<T>> {
            Ok(x.iter().map(|v| T::from_acc(-v.to_acc())).collect())
        }
    }

    #[test]
    fn gradients_take_their_inputs_dtype_and_shape() -> Result<()> {
        let x = candle_core::Var::ones((2, 3), DType::F16, &Device::Cpu)?;
        let w = candle_core::Var::ones((2, 3), DType::F16, &Device::Cpu)?;
        let y = x.apply_op2(&w, Fused(AddF64))?;
        let grads = y.sum_all()?.backward()?;
        let gx = grads
            .get(&x)
            .ok_or(candle_core::Error::Msg("no grad".into()))?;
        assert_eq!((gx.dtype(), gx.dims()), (DType::F16, &[2, 3][..]));
        assert!(grads.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn errors_name_the_op() -> Result<()> {
        let x = candle_core::Var::ones(3, DType::F32, &Device::Cpu)?;
        let y = x.apply_op1(Fused(Neg))?;
        assert_eq!(y.to_vec1::<f32>()?, [-1.0; 3]);
        let err = y.sum_all()?.backward().unwrap_err().to_string();
        assert!(err.contains("neg"), "{err}");
        let ints = Tensor::new(&[1u32], &Device::Cpu)?;
        let err = ints.apply_op1(Fused(Neg)).unwrap_err().to_string();
        assert!(err.contains("neg"), "{err}");
        let w = Tensor::ones(3, DType::F64, &Device::Cpu)?;
        assert!(x.apply_op2(&w, Fused(AddF64)).is_err(), "mixed dtypes");
        Ok(())
    }
}
