//! NumPy arrays over the link's buffers, and the checks and copies at the boundary.

use numpy::ndarray::{ArrayView, IxDyn};
use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A NumPy array of `shape` over `len` floats at `ptr`, kept alive by `owner` (the worker that
/// owns the buffer). Read-only unless `writable`.
///
/// # Safety
/// `ptr..ptr+len` must stay allocated, unmoved, for as long as `owner` lives.
pub(crate) unsafe fn view<'py>(
    owner: Bound<'py, PyAny>,
    ptr: *const f32,
    len: usize,
    shape: &[usize],
    writable: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let py = owner.py();
    // SAFETY: the caller guarantees `len` floats at `ptr` for the owner's lifetime; the view
    // lives only for this call.
    let slice = unsafe { std::slice::from_raw_parts(ptr, len) };
    let array = ArrayView::from_shape(IxDyn(shape), slice)
        .map_err(|e| PyValueError::new_err(format!("shape {shape:?} over {len} floats: {e}")))?;
    // SAFETY: `owner` becomes the array's base object, so the buffer (which the caller says
    // lives as long as the owner) outlives the array; the buffer is never reallocated.
    let array = unsafe { PyArrayDyn::borrow_from_array(&array, owner) };
    if !writable {
        let kw = PyDict::new(py);
        kw.set_item("write", false)?;
        array.call_method("setflags", (), Some(&kw))?;
    }
    Ok(array)
}

/// `obj` as a float32 NumPy array of the tensor's `shape` (or flat, of its size), or a
/// `TypeError`/`ValueError` naming what is wrong (`what`: e.g. "key 2's gradient").
pub(crate) fn float32<'py>(
    obj: &Bound<'py, PyAny>,
    shape: &[usize],
    what: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let Ok(array) = obj.cast::<PyArrayDyn<f32>>() else {
        let dtype = obj
            .getattr("dtype")
            .map(|d| d.to_string())
            .unwrap_or_else(|_| obj.get_type().to_string());
        return Err(PyTypeError::new_err(format!(
            "{what} must be a float32 NumPy array, got {dtype} (use np.asarray(x, dtype=np.float32))"
        )));
    };
    let len: usize = shape.iter().product();
    if array.shape() != shape && array.shape() != [len] {
        return Err(PyValueError::new_err(format!(
            "{what} has shape {:?}; the job's tensor has shape {shape:?} ({len} floats; a flat array of {len} will do too)",
            array.shape()
        )));
    }
    Ok(array.clone())
}

/// Copies `src` into `dst` in its logical (C) order, whatever its layout, unless it is `dst`
/// itself.
pub(crate) fn copy_into(src: &Bound<'_, PyArrayDyn<f32>>, dst: &mut [f32]) -> PyResult<()> {
    let contiguous = src.is_c_contiguous();
    if contiguous && std::ptr::eq(src.data(), dst.as_ptr()) {
        return Ok(()); // the caller wrote into the gradient buffer itself
    }
    let (start, end) = (
        dst.as_ptr() as usize,
        dst.as_ptr() as usize + size_of_val(dst),
    );
    let at = src.data() as usize;
    let overlaps = at < end && at + size_of_val(dst) > start;
    let src = src.try_readonly()?;
    if contiguous && !overlaps {
        dst.copy_from_slice(src.as_slice()?);
    } else {
        // Transposed, strided or reversed, or over dst itself: through a copy.
        let tmp: Vec<f32> = src.as_array().iter().copied().collect();
        dst.copy_from_slice(&tmp);
    }
    Ok(())
}

/// Copies `src` into `out` (of the same size) in `out`'s logical (C) order.
pub(crate) fn copy_out(src: &[f32], out: &Bound<'_, PyArrayDyn<f32>>, what: &str) -> PyResult<()> {
    if !out
        .getattr("flags")?
        .getattr("writeable")?
        .extract::<bool>()?
    {
        return Err(PyValueError::new_err(format!(
            "{what} is read-only: pass a writable array"
        )));
    }
    let contiguous = out.is_c_contiguous();
    let mut out = out.try_readwrite()?;
    if contiguous {
        out.as_slice_mut()?.copy_from_slice(src);
    } else {
        out.as_array_mut()
            .iter_mut()
            .zip(src)
            .for_each(|(o, s)| *o = *s);
    }
    Ok(())
}
