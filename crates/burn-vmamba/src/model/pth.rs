//! A small, lenient reader of PyTorch's zip checkpoints (`torch.save`, torch ≥ 1.6).
//!
//! Release checkpoints hold more than a state dict: optimizer state with integer keys, a yacs
//! `CfgNode` (a `dict` subclass rebuilt with `NEWOBJ` + `SETITEMS` + `BUILD`), scalars. This
//! pickle machine evaluates any such object into a generic value instead of failing, and only
//! rebuilds tensors (`torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`) from the zip's
//! storages. No Python code is ever run.
//!
//! Why not burn-store's `PytorchReader`: in 0.21 it stops on every committed fixture checkpoint
//! (upstream's `save_checkpoint_ema` files, `tests/fixtures/model/*.pth`), with and without the
//! top-level key `model`: "Unexpected pickle opcode SetItems in current context" (the `CfgNode`
//! above). The strict key matching of [`super::checkpoint`] would sit on top of either reader.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::state_dict::FloatDtype;

/// A tensor found in the pickle, before its storage is read.
#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage: String,
    dtype: String,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Persistent(Box<Value>),
    Tensor(TensorRef),
    /// Any other object: its class, constructor args, dict items and state.
    Object {
        class: Box<Value>,
        items: Vec<(Value, Value)>,
    },
    Mark,
}

/// A tensor read from a file: name, shape, row-major f32 values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Reads every tensor of a torch zip checkpoint: those of the top-level `model` entry when
/// the file is a dict that has one, else those of the top-level dict. Values are f32.
pub fn read(path: &Path) -> Result<Vec<NamedTensor>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        format!("not a zip archive ({e}); legacy (torch < 1.6) pickles are not supported: re-save with a recent torch or convert to .safetensors")
    })?;
    let pkl_name = (0..archive.len())
        .filter_map(|i| archive.name_for_index(i).map(str::to_string))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or("the archive has no data.pkl: not a torch.save file")?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pickle = Vec::new();
    archive
        .by_name(&pkl_name)
        .map_err(|e| e.to_string())?
        .read_to_end(&mut pickle)
        .map_err(|e| e.to_string())?;
    let root = Machine::default().run(&pickle)?;
    let state = match &root {
        Value::Dict(items) => items
            .iter()
            .find(|(k, _)| *k == Value::Str("model".into()))
            .map(|(_, v)| v.clone())
            .unwrap_or(root.clone()),
        _ => root.clone(),
    };
    let Value::Dict(items) = state else {
        return Err("the file holds no dict of tensors (nor a dict with a `model` entry)".into());
    };
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::new();
    for (key, value) in items {
        let (Value::Str(name), Value::Tensor(t)) = (key, value) else {
            continue;
        };
        if !storages.contains_key(&t.storage) {
            let mut bytes = Vec::new();
            archive
                .by_name(&format!("{prefix}data/{}", t.storage))
                .map_err(|e| format!("tensor {name}: storage {}: {e}", t.storage))?
                .read_to_end(&mut bytes)
                .map_err(|e| e.to_string())?;
            storages.insert(t.storage.clone(), bytes);
        }
        let values =
            gather(&storages[&t.storage], &t).map_err(|e| format!("tensor {name}: {e}"))?;
        out.push((name, t.size, values));
    }
    Ok(out)
}

fn gather(bytes: &[u8], t: &TensorRef) -> Result<Vec<f32>, String> {
    let dtype = FloatDtype::of_torch_storage(&t.dtype)?;
    let width = dtype.width();
    let numel: usize = t.size.iter().product();
    let mut values = Vec::with_capacity(numel);
    let mut index = vec![0usize; t.size.len()];
    for _ in 0..numel {
        let element = t.offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        let at = element * width;
        let chunk = bytes
            .get(at..at + width)
            .ok_or("storage too short for the tensor's size and strides")?;
        values.push(dtype.decode(chunk));
        for axis in (0..index.len()).rev() {
            index[axis] += 1;
            if index[axis] < t.size[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(values)
}

/// The pickle opcodes this reader evaluates (protocols 0–5 as `torch.save` writes them), by
/// their names in CPython's `pickletools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Proto,
    Frame,
    Stop,
    Mark,
    EmptyDict,
    EmptyList,
    EmptyTuple,
    /// `EMPTY_SET`, read as a list.
    EmptySet,
    Tuple,
    Tuple1,
    Tuple2,
    Tuple3,
    None,
    NewTrue,
    NewFalse,
    BinInt,
    BinInt1,
    BinInt2,
    Long1,
    Long4,
    BinFloat,
    BinUnicode,
    ShortBinUnicode,
    BinUnicode8,
    BinString,
    ShortBinString,
    BinBytes,
    ShortBinBytes,
    BinBytes8,
    Global,
    StackGlobal,
    Reduce,
    NewObj,
    NewObjEx,
    Build,
    BinPut,
    LongBinPut,
    Memoize,
    BinGet,
    LongBinGet,
    Append,
    Appends,
    /// `ADDITEMS` (to a set), read as appends.
    AddItems,
    /// `FROZENSET`, read as a list.
    FrozenSet,
    SetItem,
    SetItems,
    BinPersId,
    Pop,
    PopMark,
    Dup,
}

impl Op {
    /// The opcode of a byte, or `None` for one this reader does not evaluate.
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x80 => Self::Proto,
            0x95 => Self::Frame,
            b'.' => Self::Stop,
            b'(' => Self::Mark,
            b'}' => Self::EmptyDict,
            b']' => Self::EmptyList,
            b')' => Self::EmptyTuple,
            0x8f => Self::EmptySet,
            b't' => Self::Tuple,
            0x85 => Self::Tuple1,
            0x86 => Self::Tuple2,
            0x87 => Self::Tuple3,
            b'N' => Self::None,
            0x88 => Self::NewTrue,
            0x89 => Self::NewFalse,
            b'J' => Self::BinInt,
            b'K' => Self::BinInt1,
            b'M' => Self::BinInt2,
            0x8a => Self::Long1,
            0x8b => Self::Long4,
            b'G' => Self::BinFloat,
            b'X' => Self::BinUnicode,
            0x8c => Self::ShortBinUnicode,
            0x8d => Self::BinUnicode8,
            b'T' => Self::BinString,
            b'U' => Self::ShortBinString,
            b'B' => Self::BinBytes,
            b'C' => Self::ShortBinBytes,
            0x8e => Self::BinBytes8,
            b'c' => Self::Global,
            0x93 => Self::StackGlobal,
            b'R' => Self::Reduce,
            0x81 => Self::NewObj,
            0x92 => Self::NewObjEx,
            b'b' => Self::Build,
            b'q' => Self::BinPut,
            b'r' => Self::LongBinPut,
            0x94 => Self::Memoize,
            b'h' => Self::BinGet,
            b'j' => Self::LongBinGet,
            b'a' => Self::Append,
            b'e' => Self::Appends,
            0x90 => Self::AddItems,
            0x91 => Self::FrozenSet,
            b's' => Self::SetItem,
            b'u' => Self::SetItems,
            b'Q' => Self::BinPersId,
            b'0' => Self::Pop,
            b'1' => Self::PopMark,
            b'2' => Self::Dup,
            _ => return None,
        })
    }
}

#[derive(Default)]
struct Machine {
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl Machine {
    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or("pickle MARK missing")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack empty".to_string())
    }

    fn set_items(&mut self, flat: Vec<Value>) -> Result<(), String> {
        let mut pairs = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        match self.top()? {
            Value::Dict(items) | Value::Object { items, .. } => items.extend(pairs),
            other => return Err(format!("SETITEMS on {}", kind(other))),
        }
        Ok(())
    }

    fn run(mut self, data: &[u8]) -> Result<Value, String> {
        let mut r = Reader { data, at: 0 };
        loop {
            let byte = r.u8()?;
            let op = Op::from_byte(byte).ok_or_else(|| {
                format!(
                    "unsupported pickle opcode 0x{byte:02x} at byte {}",
                    r.at - 1
                )
            })?;
            match op {
                Op::Proto => {
                    r.u8()?;
                }
                Op::Frame => {
                    r.take(8)?;
                }
                Op::Stop => return self.pop(),
                Op::Mark => self.stack.push(Value::Mark),
                Op::EmptyDict => self.stack.push(Value::Dict(Vec::new())),
                Op::EmptyList => self.stack.push(Value::List(Vec::new())),
                Op::EmptyTuple => self.stack.push(Value::Tuple(Vec::new())),
                Op::EmptySet => self.stack.push(Value::List(Vec::new())),
                Op::Tuple => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                Op::Tuple1 | Op::Tuple2 | Op::Tuple3 => {
                    let n = usize::from(byte - 0x84);
                    let at = self
                        .stack
                        .len()
                        .checked_sub(n)
                        .ok_or("pickle stack underflow")?;
                    let items = self.stack.split_off(at);
                    self.stack.push(Value::Tuple(items));
                }
                Op::None => self.stack.push(Value::None),
                Op::NewTrue => self.stack.push(Value::Bool(true)),
                Op::NewFalse => self.stack.push(Value::Bool(false)),
                Op::BinInt => self
                    .stack
                    .push(Value::Int(i64::from(i32::from_le_bytes(r.array()?)))),
                Op::BinInt1 => self.stack.push(Value::Int(i64::from(r.u8()?))),
                Op::BinInt2 => self
                    .stack
                    .push(Value::Int(i64::from(u16::from_le_bytes(r.array()?)))),
                Op::Long1 | Op::Long4 => {
                    let n = if op == Op::Long1 {
                        usize::from(r.u8()?)
                    } else {
                        u32::from_le_bytes(r.array()?) as usize
                    };
                    let bytes = r.take(n)?;
                    let mut v: i64 = 0;
                    for (i, b) in bytes.iter().enumerate().take(8) {
                        v |= i64::from(*b) << (8 * i);
                    }
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                Op::BinFloat => self
                    .stack
                    .push(Value::Float(f64::from_be_bytes(r.array()?))),
                Op::BinUnicode
                | Op::ShortBinUnicode
                | Op::BinUnicode8
                | Op::BinString
                | Op::ShortBinString
                | Op::BinBytes
                | Op::ShortBinBytes
                | Op::BinBytes8 => {
                    let n = match op {
                        Op::ShortBinUnicode | Op::ShortBinString | Op::ShortBinBytes => {
                            usize::from(r.u8()?)
                        }
                        Op::BinUnicode8 | Op::BinBytes8 => u64::from_le_bytes(r.array()?) as usize,
                        _ => u32::from_le_bytes(r.array()?) as usize,
                    };
                    let bytes = r.take(n)?.to_vec();
                    self.stack.push(match op {
                        Op::BinUnicode
                        | Op::ShortBinUnicode
                        | Op::BinUnicode8
                        | Op::BinString
                        | Op::ShortBinString => {
                            Value::Str(String::from_utf8_lossy(&bytes).into_owned())
                        }
                        _ => Value::Bytes(bytes),
                    });
                }
                Op::Global => {
                    let module = r.line()?;
                    let name = r.line()?;
                    self.stack.push(Value::Global(module, name));
                }
                Op::StackGlobal => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                Op::Reduce => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let value = reduce(callable, args)?;
                    self.stack.push(value);
                }
                Op::NewObj | Op::NewObjEx => {
                    if op == Op::NewObjEx {
                        self.pop()?; // kwargs
                    }
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    self.stack.push(Value::Object {
                        class: Box::new(class),
                        items: Vec::new(),
                    });
                }
                Op::Build => {
                    let _state = self.pop()?; // BUILD: object state is irrelevant to tensors
                }
                Op::BinPut => {
                    let i = u32::from(r.u8()?);
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                Op::LongBinPut => {
                    let i = u32::from_le_bytes(r.array()?);
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                Op::Memoize => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                Op::BinGet | Op::LongBinGet => {
                    let i = if op == Op::BinGet {
                        u32::from(r.u8()?)
                    } else {
                        u32::from_le_bytes(r.array()?)
                    };
                    let v = self
                        .memo
                        .get(&i)
                        .cloned()
                        .ok_or_else(|| format!("pickle memo {i} missing"))?;
                    self.stack.push(v);
                }
                Op::Append => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        Value::Object { .. } => {}
                        other => return Err(format!("APPEND on {}", kind(other))),
                    }
                }
                Op::Appends | Op::AddItems => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        Value::Object { .. } => {}
                        other => return Err(format!("APPENDS on {}", kind(other))),
                    }
                }
                Op::FrozenSet => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                Op::SetItem => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                Op::SetItems => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                Op::BinPersId => {
                    let pid = self.pop()?;
                    self.stack.push(Value::Persistent(Box::new(pid)));
                }
                Op::Pop => {
                    self.pop()?;
                }
                Op::PopMark => {
                    self.pop_mark()?;
                }
                Op::Dup => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
            }
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Dict(_) => "dict",
        Value::List(_) => "list",
        Value::Tuple(_) => "tuple",
        Value::Object { .. } => "object",
        _ => "scalar",
    }
}

fn as_usizes(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Some(*i as usize),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// `callable(*args)` for the few callables that matter; anything else becomes an object.
fn reduce(callable: Value, args: Value) -> Result<Value, String> {
    let Value::Global(module, name) = &callable else {
        return Ok(Value::Object {
            class: Box::new(callable),
            items: Vec::new(),
        });
    };
    let args = match args {
        Value::Tuple(a) => a,
        other => vec![other],
    };
    Ok(match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let bad = || format!("{name}: unexpected arguments");
            let Some(Value::Persistent(pid)) = args.first() else {
                return Err(bad());
            };
            let Value::Tuple(pid) = pid.as_ref() else {
                return Err(bad());
            };
            // ('storage', <storage class>, key, location, numel)
            let (Some(Value::Global(_, dtype)), Some(Value::Str(key))) = (pid.get(1), pid.get(2))
            else {
                return Err(bad());
            };
            let offset = match args.get(1) {
                Some(Value::Int(o)) => *o as usize,
                _ => return Err(bad()),
            };
            let size = args.get(2).and_then(as_usizes).ok_or_else(bad)?;
            let stride = args.get(3).and_then(as_usizes).ok_or_else(bad)?;
            Value::Tensor(TensorRef {
                storage: key.clone(),
                dtype: dtype.clone(),
                offset,
                size,
                stride,
            })
        }
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => args
            .into_iter()
            .next()
            .ok_or("_rebuild_parameter without a tensor")?,
        ("collections", "OrderedDict") => {
            let mut items = Vec::new();
            if let Some(Value::List(pairs)) = args.first() {
                for pair in pairs {
                    if let Value::Tuple(kv) | Value::List(kv) = pair
                        && kv.len() == 2
                    {
                        items.push((kv[0].clone(), kv[1].clone()));
                    }
                }
            }
            Value::Dict(items)
        }
        _ => Value::Object {
            class: Box::new(callable),
            items: Vec::new(),
        },
    })
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or("pickle truncated")?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.at..];
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("pickle line not terminated")?;
        self.at += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}
