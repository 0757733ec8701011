//! Python objects <-> kombu JSON, without the `json` module and without an
//! intermediate value tree.
//!
//! Encoding: [`PyJson`] is a `serde::Serialize` that walks a Python object. Written
//! with [`crate::protocol::json::PythonFormatter`] (as [`dumps`], [`dumps_into`] and
//! [`write`] do) the bytes equal `kombu.utils.json.dumps(obj).encode()`.
//!
//! The order of checks follows Python's `json` encoder and kombu's `default()`:
//! exact `str`/`int`/`float`/`bool`/`None`/`list`/`tuple`/`dict` first (the hot path,
//! one pointer compare each), then the exact marker types, then subclasses of the JSON
//! types (json encodes those natively, so `__json__` on them is ignored, as in kombu),
//! then `__json__()`, then subclasses of the marker types, then `bytearray` (an
//! extension: kombu refuses it; we write it like `bytes`).
//!
//! Errors while walking are Python exceptions. serde can only carry a message, so the
//! exception itself is parked in a thread-local and picked up by [`write`] /
//! [`encode_error`]. Code that serializes a `PyJson` inside its own `Serialize` value
//! must therefore use [`write`] (or map the error with [`encode_error`]); otherwise a
//! `TypeError` would surface as a `DecodeError`.
//!
//! Decoding: [`loads`] drives a `serde::de::DeserializeSeed` that builds Python objects
//! as the parser reads, turning kombu markers back into objects the way
//! `kombu.utils.json.loads` does.

use std::cell::RefCell;
use std::fmt;
use std::ptr::addr_of_mut;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyFloat, PyList, PyString, PyTuple, PyType};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::{self, Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::protocol::json::{self as pjson, MarkerType, RawJson, TYPE_KEY, VALUE_KEY};
use crate::py::exceptions::DecodeError;

/// Containers (and `__json__` results) nested deeper than this are refused. Python's
/// `json` raises `ValueError("Circular reference detected")` for a cycle and
/// `RecursionError` for deep nesting; we raise `ValueError` for both.
pub const MAX_DEPTH: u32 = pjson::MAX_DEPTH;

const DEPTH_MESSAGE: &str = "circular reference or nesting too deep";

// ---------------------------------------------------------------------------
// Cached Python objects

struct Types {
    datetime: Py<PyType>,
    date: Py<PyType>,
    time: Py<PyType>,
    decimal: Py<PyType>,
    uuid: Py<PyType>,
    /// `datetime.isoformat`, unbound: kombu calls it on the base class.
    datetime_isoformat: Py<PyAny>,
    /// `int.__repr__`, unbound: json writes int subclasses with it.
    int_repr: Py<PyAny>,
    datetime_fromisoformat: Py<PyAny>,
    time_fromisoformat: Py<PyAny>,
    b64decode: Py<PyAny>,
}

static TYPES: PyOnceLock<Types> = PyOnceLock::new();

fn types(py: Python<'_>) -> PyResult<&'static Types> {
    TYPES.get_or_try_init(py, || {
        let dt = py.import("datetime")?;
        let datetime = dt.getattr("datetime")?.cast_into::<PyType>()?;
        let time = dt.getattr("time")?.cast_into::<PyType>()?;
        let builtins = py.import("builtins")?;
        Ok::<_, PyErr>(Types {
            datetime_isoformat: datetime.getattr("isoformat")?.unbind(),
            datetime_fromisoformat: datetime.getattr("fromisoformat")?.unbind(),
            time_fromisoformat: time.getattr("fromisoformat")?.unbind(),
            datetime: datetime.unbind(),
            time: time.unbind(),
            date: dt.getattr("date")?.cast_into::<PyType>()?.unbind(),
            decimal: py
                .import("decimal")?
                .getattr("Decimal")?
                .cast_into::<PyType>()?
                .unbind(),
            uuid: py
                .import("uuid")?
                .getattr("UUID")?
                .cast_into::<PyType>()?
                .unbind(),
            int_repr: builtins.getattr("int")?.getattr("__repr__")?.unbind(),
            b64decode: py.import("base64")?.getattr("b64decode")?.unbind(),
        })
    })
}

#[inline]
fn type_ptr(t: &Py<PyType>) -> *mut ffi::PyTypeObject {
    t.as_ptr().cast()
}

// ---------------------------------------------------------------------------
// Errors carried through serde

enum Seg {
    Index(usize),
    Key(String),
}

struct Pending {
    err: PyErr,
    /// `Display` of the serde error created for `err`, to recognise it later.
    message: String,
    /// Whether the location inside the value is appended to the message.
    add_path: bool,
    /// Innermost first.
    path: Vec<Seg>,
}

thread_local! {
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// Park `err` and return the serde error standing for it.
#[cold]
fn fail<E: ser::Error>(err: PyErr, add_path: bool) -> E {
    let message = Python::attach(|py| {
        let value = err.value(py);
        value
            .str()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unprintable error".to_owned())
    });
    PENDING.with(|p| {
        *p.borrow_mut() = Some(Pending {
            err,
            message: message.clone(),
            add_path,
            path: Vec::new(),
        });
    });
    E::custom(message)
}

#[cold]
fn note(seg: Seg) {
    PENDING.with(|p| {
        if let Some(pending) = p.borrow_mut().as_mut() {
            pending.path.push(seg);
        }
    });
}

fn clear_pending() {
    PENDING.with(|p| {
        p.borrow_mut().take();
    });
}

/// The Python exception for a failed serialization of a value containing [`PyJson`]
/// (the parked exception when there is one, with its location in the value).
pub fn encode_error(err: crate::error::Error) -> PyErr {
    let text = err.to_string();
    let pending = PENDING.with(|p| p.borrow_mut().take());
    match pending {
        Some(p) if text.contains(&p.message) => {
            if p.add_path && !p.path.is_empty() {
                let mut where_ = String::new();
                for seg in p.path.iter().rev() {
                    match seg {
                        Seg::Index(i) => where_.push_str(&format!("[{i}]")),
                        Seg::Key(k) => where_.push_str(&format!("[{k}]")),
                    }
                }
                Python::attach(|py| {
                    let ty = p.err.get_type(py);
                    match ty.call1((format!("{} (at {where_})", p.message),)) {
                        Ok(v) => PyErr::from_value(v),
                        Err(_) => p.err,
                    }
                })
            } else {
                p.err
            }
        }
        _ => match err {
            crate::error::Error::Json(_) => PyTypeError::new_err(text),
            other => other.into(),
        },
    }
}

#[cold]
fn not_serializable<E: ser::Error>(obj: &Bound<'_, PyAny>) -> E {
    let name = obj
        .get_type()
        .name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".to_owned());
    fail(
        PyTypeError::new_err(format!("Object of type {name} is not JSON serializable")),
        true,
    )
}

#[cold]
fn too_deep<E: ser::Error>() -> E {
    fail(PyValueError::new_err(DEPTH_MESSAGE), false)
}

// ---------------------------------------------------------------------------
// Encoding

/// A Python object as a `serde::Serialize`, written as kombu's JSON encoder would.
pub struct PyJson<'a, 'py>(pub &'a Bound<'py, PyAny>);

impl Serialize for PyJson<'_, '_> {
    #[inline]
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Walk {
            obj: self.0,
            depth: 0,
        }
        .serialize(serializer)
    }
}

struct Walk<'a, 'py> {
    obj: &'a Bound<'py, PyAny>,
    depth: u32,
}

impl Serialize for Walk<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let obj = self.obj;
        let tp = obj.get_type_ptr();
        // SAFETY: only the addresses of the static type objects and singletons are
        // read, and each `cast_unchecked` follows an exact type match.
        unsafe {
            if tp == addr_of_mut!(ffi::PyUnicode_Type) {
                return ser_str(obj.cast_unchecked::<PyString>(), s);
            }
            if tp == addr_of_mut!(ffi::PyLong_Type) {
                return ser_int(obj, s, false);
            }
            if tp == addr_of_mut!(ffi::PyFloat_Type) {
                return ser_float(obj, s);
            }
            if tp == addr_of_mut!(ffi::PyBool_Type) {
                return s.serialize_bool(obj.as_ptr() == ffi::Py_True());
            }
            if obj.as_ptr() == ffi::Py_None() {
                return s.serialize_unit();
            }
            if tp == addr_of_mut!(ffi::PyList_Type) {
                return self.ser_list(obj.cast_unchecked::<PyList>(), s);
            }
            if tp == addr_of_mut!(ffi::PyDict_Type) {
                return self.ser_dict(obj.cast_unchecked::<PyDict>(), s, true);
            }
            if tp == addr_of_mut!(ffi::PyTuple_Type) {
                return self.ser_tuple(obj.cast_unchecked::<PyTuple>(), s);
            }
        }
        self.serialize_rare(tp, s)
    }
}

impl<'py> Walk<'_, 'py> {
    #[inline]
    fn child<'b>(&self, obj: &'b Bound<'py, PyAny>) -> Walk<'b, 'py> {
        Walk {
            obj,
            depth: self.depth + 1,
        }
    }

    fn serialize_rare<S: Serializer>(
        &self,
        tp: *mut ffi::PyTypeObject,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let obj = self.obj;
        let py = obj.py();
        let t = types(py).map_err(|e| fail(e, false))?;
        // Exact marker types (their classes define no `__json__`).
        if tp == type_ptr(&t.datetime) {
            return self.ser_datetime(t, s);
        }
        if tp == type_ptr(&t.date) {
            return self.ser_isoformat(MarkerType::Date, s);
        }
        if tp == type_ptr(&t.time) {
            return self.ser_isoformat(MarkerType::Time, s);
        }
        if tp == type_ptr(&t.uuid) {
            return self.ser_uuid(s);
        }
        if tp == type_ptr(&t.decimal) {
            return self.ser_decimal(s);
        }
        if tp == addr_of_mut!(ffi::PyBytes_Type) {
            // SAFETY: exact bytes.
            return ser_bytes(unsafe { obj.cast_unchecked::<PyBytes>() }.as_bytes(), s);
        }
        // Subclasses of what json writes natively (before `default()`, as json does).
        if let Ok(v) = obj.cast::<PyString>() {
            return ser_str(v, s);
        }
        if obj.is_instance_of::<pyo3::types::PyInt>() {
            return ser_int(obj, s, true);
        }
        if obj.is_instance_of::<PyFloat>() {
            return ser_float(obj, s);
        }
        if let Ok(v) = obj.cast::<PyList>() {
            return self.ser_list(v, s);
        }
        if let Ok(v) = obj.cast::<PyTuple>() {
            return self.ser_tuple(v, s);
        }
        if let Ok(v) = obj.cast::<PyDict>() {
            return self.ser_dict(v, s, false);
        }
        // kombu's `default()`: `__json__` first, then the marker types by isinstance.
        let reducer = obj
            .getattr_opt(pyo3::intern!(py, "__json__"))
            .map_err(|e| fail(e, false))?;
        if let Some(reducer) = reducer {
            if self.depth >= MAX_DEPTH {
                return Err(too_deep());
            }
            let value = reducer.call0().map_err(|e| fail(e, false))?;
            return self.child(&value).serialize(s);
        }
        let isinstance = |ty: &Py<PyType>| obj.is_instance(ty.bind(py)).unwrap_or(false);
        if isinstance(&t.datetime) {
            return self.ser_datetime(t, s);
        }
        if isinstance(&t.date) {
            return self.ser_isoformat(MarkerType::Date, s);
        }
        if isinstance(&t.time) {
            return self.ser_isoformat(MarkerType::Time, s);
        }
        if isinstance(&t.decimal) {
            return self.ser_decimal(s);
        }
        if isinstance(&t.uuid) {
            return self.ser_uuid(s);
        }
        if let Ok(b) = obj.cast::<PyBytes>() {
            return ser_bytes(b.as_bytes(), s);
        }
        if let Ok(b) = obj.cast::<PyByteArray>() {
            return ser_bytes(&b.to_vec(), s);
        }
        Err(not_serializable(obj))
    }

    fn ser_list<S: Serializer>(&self, list: &Bound<'py, PyList>, s: S) -> Result<S::Ok, S::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let mut seq = s.serialize_seq(Some(list.len()))?;
        for (i, item) in list.iter().enumerate() {
            seq.serialize_element(&self.child(&item))
                .inspect_err(|_| note(Seg::Index(i)))?;
        }
        seq.end()
    }

    fn ser_tuple<S: Serializer>(
        &self,
        tuple: &Bound<'py, PyTuple>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let mut seq = s.serialize_seq(Some(tuple.len()))?;
        for (i, item) in tuple.iter().enumerate() {
            seq.serialize_element(&self.child(&item))
                .inspect_err(|_| note(Seg::Index(i)))?;
        }
        seq.end()
    }

    fn ser_dict<S: Serializer>(
        &self,
        dict: &Bound<'py, PyDict>,
        s: S,
        exact: bool,
    ) -> Result<S::Ok, S::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let mut map = s.serialize_map(Some(dict.len()))?;
        if exact || dict.is_empty() {
            for (key, value) in dict.iter() {
                self.ser_entry(&mut map, &key, &value)?;
            }
        } else {
            // json asks a dict subclass for `items()`.
            let items = dict
                .call_method0(pyo3::intern!(dict.py(), "items"))
                .and_then(|items| items.try_iter())
                .map_err(|e| fail(e, false))?;
            for item in items {
                let item = item.map_err(|e| fail(e, false))?;
                let (key, value) = item
                    .extract::<(Bound<'py, PyAny>, Bound<'py, PyAny>)>()
                    .map_err(|e| fail(e, false))?;
                self.ser_entry(&mut map, &key, &value)?;
            }
        }
        map.end()
    }

    fn ser_entry<M: SerializeMap>(
        &self,
        map: &mut M,
        key: &Bound<'py, PyAny>,
        value: &Bound<'py, PyAny>,
    ) -> Result<(), M::Error> {
        let key_text = dict_key(key).map_err(|e| fail::<M::Error>(e, true))?;
        map.serialize_key(key_text.as_str())?;
        map.serialize_value(&self.child(value)).inspect_err(|_| {
            note(Seg::Key(
                pjson::to_vec(key_text.as_str())
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default(),
            ));
        })
    }

    fn ser_marker<S: Serializer>(
        &self,
        kind: MarkerType,
        value: &Bound<'py, PyAny>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry(TYPE_KEY, kind.name())?;
        map.serialize_entry(VALUE_KEY, &self.child(value))?;
        map.end()
    }

    fn ser_datetime<S: Serializer>(&self, t: &Types, s: S) -> Result<S::Ok, S::Error> {
        let text = t
            .datetime_isoformat
            .bind(self.obj.py())
            .call1((self.obj,))
            .map_err(|e| fail(e, false))?;
        self.ser_marker(MarkerType::DateTime, &text, s)
    }

    /// `date` and `time`: kombu calls the (possibly overridden) `isoformat()`.
    fn ser_isoformat<S: Serializer>(&self, kind: MarkerType, s: S) -> Result<S::Ok, S::Error> {
        let text = self
            .obj
            .call_method0(pyo3::intern!(self.obj.py(), "isoformat"))
            .map_err(|e| fail(e, false))?;
        self.ser_marker(kind, &text, s)
    }

    fn ser_decimal<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.obj.str().map_err(|e| fail(e, false))?;
        self.ser_marker(MarkerType::Decimal, text.as_any(), s)
    }

    fn ser_uuid<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let py = self.obj.py();
        let hex = self
            .obj
            .getattr(pyo3::intern!(py, "hex"))
            .map_err(|e| fail(e, false))?;
        if self.depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry(TYPE_KEY, MarkerType::Uuid.name())?;
        map.serialize_entry(VALUE_KEY, &HexValue(self.child(&hex)))?;
        map.end()
    }
}

/// `{"hex": <value>}`, the value of kombu's uuid marker.
struct HexValue<'a, 'py>(Walk<'a, 'py>);

impl Serialize for HexValue<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("hex", &self.0)?;
        map.end()
    }
}

fn ser_str<S: Serializer>(v: &Bound<'_, PyString>, s: S) -> Result<S::Ok, S::Error> {
    match v.to_str() {
        Ok(text) => s.serialize_str(text),
        Err(_) => {
            // Lone surrogates: Python escapes them as `\udXXX`.
            let escaped = surrogate_string(v).map_err(|e| fail(e, false))?;
            RawJson(&escaped).serialize(s)
        }
    }
}

#[cold]
fn surrogate_string(v: &Bound<'_, PyString>) -> PyResult<String> {
    let py = v.py();
    // SAFETY: `v` is a valid str; the result is a new reference or NULL with an error set.
    let bytes = unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            ffi::PyUnicode_AsEncodedString(
                v.as_ptr(),
                c"utf-8".as_ptr(),
                c"surrogatepass".as_ptr(),
            ),
        )?
    };
    let bytes = bytes.cast_into::<PyBytes>()?;
    let mut out = Vec::with_capacity(bytes.as_bytes().len() + 8);
    pjson::write_wtf8_string(&mut out, bytes.as_bytes())?;
    String::from_utf8(out).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The text of an int exactly as `int.__repr__` writes it.
fn int_text(obj: &Bound<'_, PyAny>, subclass: bool) -> PyResult<String> {
    let text = if subclass {
        types(obj.py())?
            .int_repr
            .bind(obj.py())
            .call1((obj,))?
            .str()?
    } else {
        obj.repr()?
    };
    Ok(text.to_str()?.to_owned())
}

fn ser_int<S: Serializer>(obj: &Bound<'_, PyAny>, s: S, subclass: bool) -> Result<S::Ok, S::Error> {
    let mut overflow = 0;
    // SAFETY: `obj` is an int (or subclass); this reads its value without calling Python.
    let v = unsafe { ffi::PyLong_AsLongLongAndOverflow(obj.as_ptr(), &mut overflow) };
    if overflow == 0 {
        if v == -1 {
            if let Some(err) = PyErr::take(obj.py()) {
                return Err(fail(err, false));
            }
        }
        return s.serialize_i64(v);
    }
    let text = int_text(obj, subclass).map_err(|e| fail(e, false))?;
    RawJson(&text).serialize(s)
}

fn ser_float<S: Serializer>(obj: &Bound<'_, PyAny>, s: S) -> Result<S::Ok, S::Error> {
    // SAFETY: `obj` is a float (or subclass): this reads its value, it cannot fail.
    let v = unsafe { ffi::PyFloat_AsDouble(obj.as_ptr()) };
    if v.is_finite() {
        s.serialize_f64(v)
    } else {
        RawJson(&pjson::float_repr(v)).serialize(s)
    }
}

fn ser_bytes<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(2))?;
    match std::str::from_utf8(data) {
        Ok(text) => {
            map.serialize_entry(TYPE_KEY, MarkerType::Bytes.name())?;
            map.serialize_entry(VALUE_KEY, text)?;
        }
        Err(_) => {
            map.serialize_entry(TYPE_KEY, MarkerType::Base64.name())?;
            map.serialize_entry(VALUE_KEY, &pjson::encode_base64(data))?;
        }
    }
    map.end()
}

enum KeyText<'a> {
    Borrowed(&'a str),
    Owned(String),
}

impl KeyText<'_> {
    fn as_str(&self) -> &str {
        match self {
            KeyText::Borrowed(s) => s,
            KeyText::Owned(s) => s,
        }
    }
}

/// A dict key as json writes it: str as is; float, True/False/None, int converted.
fn dict_key<'a>(key: &'a Bound<'_, PyAny>) -> PyResult<KeyText<'a>> {
    if let Ok(s) = key.cast::<PyString>() {
        return Ok(KeyText::Borrowed(s.to_str()?));
    }
    if key.is_instance_of::<PyFloat>() {
        // SAFETY: a float (or subclass).
        let v = unsafe { ffi::PyFloat_AsDouble(key.as_ptr()) };
        return Ok(KeyText::Owned(pjson::float_repr(v)));
    }
    // SAFETY: comparisons with the interpreter's singletons.
    unsafe {
        if key.as_ptr() == ffi::Py_True() {
            return Ok(KeyText::Borrowed("true"));
        }
        if key.as_ptr() == ffi::Py_False() {
            return Ok(KeyText::Borrowed("false"));
        }
        if key.as_ptr() == ffi::Py_None() {
            return Ok(KeyText::Borrowed("null"));
        }
    }
    if key.is_instance_of::<pyo3::types::PyInt>() {
        let mut overflow = 0;
        // SAFETY: an int (or subclass).
        let v = unsafe { ffi::PyLong_AsLongLongAndOverflow(key.as_ptr(), &mut overflow) };
        if overflow == 0 && !(v == -1 && PyErr::occurred(key.py())) {
            return Ok(KeyText::Owned(v.to_string()));
        }
        if let Some(err) = PyErr::take(key.py()) {
            return Err(err);
        }
        let subclass = !key.is_exact_instance_of::<pyo3::types::PyInt>();
        return Ok(KeyText::Owned(int_text(key, subclass)?));
    }
    Err(PyTypeError::new_err(format!(
        "keys must be str, int, float, bool or None, not {}",
        tp_name(&key.get_type())
    )))
}

/// The C `tp_name` of a type, as Python's json puts it in messages: `tuple`,
/// `datetime.date`, `MyClass`. (The limited API has no direct access to it: static
/// types derive `__module__` and `__name__` from it; heap types use `__name__`.)
fn tp_name(ty: &Bound<'_, PyType>) -> String {
    let name = ty
        .name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".to_owned());
    // SAFETY: reads the flags of a live type object.
    let flags = unsafe { ffi::PyType_GetFlags(ty.as_type_ptr()) };
    if flags & ffi::Py_TPFLAGS_HEAPTYPE != 0 {
        return name;
    }
    match ty.module() {
        Ok(module) if module.to_str().is_ok_and(|m| m != "builtins") => {
            format!("{}.{name}", module.to_string_lossy())
        }
        _ => name,
    }
}

/// Serialize `value` (which may contain [`PyJson`] parts) into `buf` with
/// [`PythonFormatter`](crate::protocol::json::PythonFormatter), raising the Python
/// exception a `PyJson` part met. On error `buf` may hold a partial write.
pub fn write<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) -> PyResult<()> {
    clear_pending();
    pjson::write(buf, value).map_err(encode_error)
}

/// Append `kombu.utils.json.dumps(obj)` as UTF-8 to `buf`. On error `buf` is left as
/// it was.
pub fn dumps_into(buf: &mut Vec<u8>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
    let start = buf.len();
    let result = write(buf, &PyJson(obj));
    if result.is_err() {
        buf.truncate(start);
    }
    result
}

/// `kombu.utils.json.dumps(obj).encode()`.
pub fn dumps(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let mut buf = Vec::with_capacity(128);
    dumps_into(&mut buf, obj)?;
    Ok(buf)
}

// ---------------------------------------------------------------------------
// Decoding

/// `kombu.utils.json.loads(data)`: JSON to Python objects, kombu markers decoded.
/// Bad input raises [`DecodeError`].
pub fn loads<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let mut parser = pjson::Parser::new(data);
    let value = PySeed(py)
        .deserialize(&mut parser)
        .map_err(|e| DecodeError::new_err(e.to_string()))?;
    parser
        .end()
        .map_err(|e| DecodeError::new_err(e.to_string()))?;
    Ok(value)
}

/// Builds Python objects from any serde `Deserializer` (JSON data model).
#[derive(Clone, Copy)]
pub struct PySeed<'py>(pub Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for PySeed<'py> {
    type Value = Bound<'py, PyAny>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn py_err<E: de::Error>(err: PyErr) -> E {
    E::custom(err)
}

impl<'de, 'py> Visitor<'de> for PySeed<'py> {
    type Value = Bound<'py, PyAny>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(pyo3::types::PyBool::new(self.0, v).to_owned().into_any())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(pyo3::types::PyInt::new(self.0, v).into_any())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(pyo3::types::PyInt::new(self.0, v).into_any())
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        Ok(pyo3::types::PyInt::new(self.0, v).into_any())
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        Ok(pyo3::types::PyInt::new(self.0, v).into_any())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(PyFloat::new(self.0, v).into_any())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(PyString::new(self.0, v).into_any())
    }

    /// A string with lone surrogates, as WTF-8 (see `protocol::json::Parser`).
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        wtf8_to_str(self.0, v).map(Bound::into_any).map_err(py_err)
    }

    /// An integer beyond 64 bits (see `protocol::json::BIG_INT_TOKEN`).
    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(BigIntVisitor(self.0))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(self.0.None().into_bound(self.0))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let list = PyList::empty(self.0);
        while let Some(item) = seq.next_element_seed(self)? {
            list.append(item).map_err(py_err)?;
        }
        Ok(list.into_any())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let py = self.0;
        let dict = PyDict::new(py);
        let mut marker_keys = 0u8;
        while let Some((key, flag)) = map.next_key_seed(KeySeed(py))? {
            marker_keys |= flag;
            let value = map.next_value_seed(self)?;
            dict.set_item(key, value).map_err(py_err)?;
        }
        if marker_keys == 3 && dict.len() == 2 {
            return decode_marker(&dict).map_err(de::Error::custom);
        }
        Ok(dict.into_any())
    }
}

fn wtf8_to_str<'py>(py: Python<'py>, v: &[u8]) -> PyResult<Bound<'py, PyString>> {
    PyBytes::new(py, v)
        .call_method1("decode", ("utf-8", "surrogatepass"))?
        .cast_into::<PyString>()
        .map_err(PyErr::from)
}

struct BigIntVisitor<'py>(Python<'py>);

impl<'de, 'py> Visitor<'de> for BigIntVisitor<'py> {
    type Value = Bound<'py, PyAny>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the digits of an integer")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let digits = std::ffi::CString::new(v).map_err(E::custom)?;
        // SAFETY: a NUL-terminated string; the result is a new reference or NULL with an
        // error set (e.g. beyond `sys.get_int_max_str_digits()`, as in Python's json).
        unsafe {
            Bound::from_owned_ptr_or_err(
                self.0,
                ffi::PyLong_FromString(digits.as_ptr(), std::ptr::null_mut(), 10),
            )
        }
        .map_err(py_err)
    }
}

/// A map key: the Python str, and 1 for `__type__` / 2 for `__value__`.
struct KeySeed<'py>(Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for KeySeed<'py> {
    type Value = (Bound<'py, PyString>, u8);

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, 'py> Visitor<'de> for KeySeed<'py> {
    type Value = (Bound<'py, PyString>, u8);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let flag = match v {
            TYPE_KEY => 1,
            VALUE_KEY => 2,
            _ => 0,
        };
        Ok((PyString::new(self.0, v), flag))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok((wtf8_to_str(self.0, v).map_err(py_err)?, 0))
    }
}

/// `{"__type__": T, "__value__": V}` to the object kombu's `object_hook` makes of it.
fn decode_marker<'py>(dict: &Bound<'py, PyDict>) -> Result<Bound<'py, PyAny>, String> {
    let py = dict.py();
    let type_obj = dict
        .get_item(TYPE_KEY)
        .ok()
        .flatten()
        .ok_or("kombu type marker without __type__")?;
    let value = dict
        .get_item(VALUE_KEY)
        .ok()
        .flatten()
        .ok_or("kombu type marker without __value__")?;
    let type_name = match type_obj.cast::<PyString>() {
        Ok(s) => s.to_str().map_err(|e| e.to_string())?.to_owned(),
        Err(_) => {
            let repr = type_obj
                .repr()
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(format!(
                "unsupported kombu type marker {{\"__type__\": {repr}}}"
            ));
        }
    };
    let kind = MarkerType::from_name(&type_name).map_err(|e| e.to_string())?;
    let t = types(py).map_err(|e| e.to_string())?;
    let describe = |e: PyErr| {
        let value_repr = value
            .repr()
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!(
            "kombu {} marker with __value__ {value_repr}: {e}",
            kind.name()
        )
    };
    let result = match kind {
        MarkerType::DateTime => t.datetime_fromisoformat.bind(py).call1((&value,)),
        MarkerType::Date => t
            .datetime_fromisoformat
            .bind(py)
            .call1((&value,))
            .and_then(|d| d.call_method0("date")),
        MarkerType::Time => t.time_fromisoformat.bind(py).call1((&value,)),
        MarkerType::Decimal => t.decimal.bind(py).call1((&value,)),
        MarkerType::Uuid => match value.cast::<PyDict>() {
            Ok(kwargs) => t.uuid.bind(py).call((), Some(kwargs)),
            Err(_) => Err(PyTypeError::new_err("uuid marker value must be an object")),
        },
        MarkerType::Bytes => match value.cast::<PyString>() {
            Ok(s) => s
                .to_str()
                .map(|text| PyBytes::new(py, text.as_bytes()).into_any()),
            Err(_) => Err(PyTypeError::new_err("bytes marker value must be a string")),
        },
        MarkerType::Base64 => match value.cast::<PyString>() {
            Ok(s) => match s.to_str() {
                Ok(text) => match pjson::decode_base64(text) {
                    Ok(data) => Ok(PyBytes::new(py, &data).into_any()),
                    // Python's decoder is laxer than ours: let it decide.
                    Err(_) => t
                        .b64decode
                        .bind(py)
                        .call1((PyBytes::new(py, text.as_bytes()),)),
                },
                Err(e) => Err(e),
            },
            Err(_) => Err(PyTypeError::new_err("base64 marker value must be a string")),
        },
    };
    result.map_err(describe)
}

// ---------------------------------------------------------------------------
// Python functions

/// JSON bytes as kombu writes them.
#[pyfunction(name = "dumps")]
fn py_dumps<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let buf = dumps(obj)?;
    Ok(PyBytes::new(obj.py(), &buf))
}

/// Parse JSON (bytes or str), turning kombu type markers back into objects.
#[pyfunction(name = "loads")]
fn py_loads<'py>(data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = data.py();
    if let Ok(b) = data.cast::<PyBytes>() {
        return loads(py, b.as_bytes());
    }
    if let Ok(s) = data.cast::<PyString>() {
        let text = s
            .to_str()
            .map_err(|e| DecodeError::new_err(format!("invalid JSON text: {e}")))?;
        return loads(py, text.as_bytes());
    }
    if let Ok(b) = data.cast::<PyByteArray>() {
        return loads(py, &b.to_vec());
    }
    let name = data
        .get_type()
        .name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".to_owned());
    Err(PyTypeError::new_err(format!(
        "loads() expects bytes or str, not {name}"
    )))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_dumps, m)?)?;
    m.add_function(wrap_pyfunction!(py_loads, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyo3::types::PyDict;

    fn attach<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> R {
        Python::initialize();
        Python::attach(f)
    }

    fn py_eval<'py>(py: Python<'py>, code: &str) -> Bound<'py, PyAny> {
        let code = std::ffi::CString::new(code).unwrap();
        py.eval(&code, None, None).unwrap()
    }

    #[test]
    fn pyjson_inside_a_rust_value() {
        attach(|py| {
            let args = py_eval(py, "(1, 'é', None)");
            let kwargs = py_eval(py, "{'when': __import__('datetime').date(2024, 1, 2)}");
            let body = (PyJson(&args), PyJson(&kwargs), "x");
            let mut buf = Vec::new();
            write(&mut buf, &body).unwrap();
            assert_eq!(
                String::from_utf8(buf).unwrap(),
                r#"[[1, "\u00e9", null], {"when": {"__type__": "date", "__value__": "2024-01-02"}}, "x"]"#
            );
        });
    }

    #[test]
    fn errors_keep_their_python_type() {
        attach(|py| {
            let bad = py_eval(py, "{'a': [1, {2, 3}]}");
            let mut buf = b"prefix".to_vec();
            let err = dumps_into(&mut buf, &bad).unwrap_err();
            assert!(err.is_instance_of::<PyTypeError>(py));
            assert_eq!(
                err.value(py).to_string(),
                r#"Object of type set is not JSON serializable (at ["a"][1])"#
            );
            assert_eq!(buf, b"prefix");

            // Through the plain-Rust writer, then mapped.
            let wrapped = (PyJson(&bad),);
            let err = encode_error(pjson::to_vec(&wrapped).unwrap_err());
            assert!(err.is_instance_of::<PyTypeError>(py));

            // A `__json__` that raises keeps its exception.
            let boom = py_eval(py, "type('Boom', (), {'__json__': lambda self: 1 / 0})()");
            let err = dumps(&boom).unwrap_err();
            assert!(err.is_instance_of::<pyo3::exceptions::PyZeroDivisionError>(py));

            let cyclic = PyDict::new(py);
            cyclic.set_item("me", &cyclic).unwrap();
            let err = dumps(cyclic.as_any()).unwrap_err();
            assert!(err.is_instance_of::<PyValueError>(py));
        });
    }

    #[test]
    fn loads_round_trip_and_errors() {
        attach(|py| {
            let value = loads(
                py,
                br#"{"n": 123456789012345678901234567890, "u": {"__type__": "uuid", "__value__": {"hex": "00000000000000000000000000000001"}}}"#,
            )
            .unwrap();
            assert_eq!(
                dumps(&value).unwrap(),
                br#"{"n": 123456789012345678901234567890, "u": {"__type__": "uuid", "__value__": {"hex": "00000000000000000000000000000001"}}}"#
            );
            let err = loads(py, b"[1,").unwrap_err();
            assert!(err.is_instance_of::<DecodeError>(py));
            let err = loads(py, br#"{"__type__": "nope", "__value__": 1}"#).unwrap_err();
            assert!(err.is_instance_of::<DecodeError>(py));
            assert!(err
                .value(py)
                .to_string()
                .contains("unsupported kombu type marker"));
        });
    }
}
