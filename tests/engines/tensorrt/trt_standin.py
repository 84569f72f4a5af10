"""A stand-in for the ``tensorrt`` module, generated from and checked against NVIDIA's real bindings.

The TensorRT backend's logic tests run on CPU machines without TensorRT. A hand-written fake would
drift from TensorRT's API (a renamed method, a keyword that does not exist, an enum member of one
major only) and the tests would keep passing. So the fake's API surface is not written by hand:

* :data:`SOURCE` names, per real TensorRT class, exactly the members the backend uses;
* :func:`make_standin` builds a module from the real API dump (``trt_bindings.api(major)``) for those
  members only: it refuses a member the real bindings lack (:class:`StandinDriftError`), every call
  is checked against the real pybind11 signatures (positional count, keyword names, enum types), and
  any other attribute raises ``AttributeError`` naming the class and the TensorRT version;
* what the members do lives in ``trt_standin_behaviour`` (a small simulation of TensorRT on a CPU,
  onnxruntime running the graph): one class per TensorRT class, whose public members must be
  exactly the :data:`SOURCE` entries (checked too, so the list and the behaviour stay in sync).

A member the backend starts using goes into :data:`SOURCE` and into the behaviour; ``test_standin.py``
checks every entry against both TensorRT 10 and 11. :func:`check_call` judges a recorded call (made on
a stand-in of one version) against the other version's real signatures.

Import it with this directory on ``sys.path`` (the tests' conftest puts it there).
"""

from __future__ import annotations

import inspect
import re
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

import trt_bindings
import trt_standin_behaviour as behaviour

#: Per real TensorRT class (its qualname in the API dump), the members the stand-in provides: methods
#: (``__init__``: constructible), properties and enum members. ``<module>``: module-level names.
#: Only what the backend uses, and only members present in both TensorRT 10 and 11.
SOURCE: dict[str, tuple[str, ...]] = {
    "<module>": ("__version__", "Builder", "BuilderFlag", "DataType", "ILogger", "IProgressMonitor",
                 "LayerInformationFormat", "Logger", "MemoryPoolType", "NetworkDefinitionCreationFlag",
                 "OnnxParser", "OnnxParserRefitter", "ProfilingVerbosity", "Refitter", "Runtime", "TensorIOMode"),
    "ILogger": ("__init__", "log"),
    "ILogger.Severity": ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"),
    "Logger": ("__init__", "log", "min_severity"),
    "IProgressMonitor": ("__init__", "phase_start", "step_complete", "phase_finish"),
    "Builder": ("__init__", "create_network", "create_builder_config", "create_optimization_profile",
                "build_serialized_network"),
    "INetworkDefinition": ("num_inputs", "num_outputs", "get_input", "get_output"),
    "ITensor": ("name", "shape", "dtype"),
    "OnnxParser": ("__init__", "parse_from_file", "num_errors", "get_error"),
    "ParserError": ("desc", "node"),
    "IBuilderConfig": ("builder_optimization_level", "profiling_verbosity", "progress_monitor",
                       "num_optimization_profiles", "set_memory_pool_limit", "get_memory_pool_limit", "set_flag",
                       "get_flag", "add_optimization_profile", "create_timing_cache", "set_timing_cache",
                       "get_timing_cache"),
    "IOptimizationProfile": ("set_shape", "get_shape"),
    "ITimingCache": ("serialize", "combine"),
    "IHostMemory": ("nbytes",),
    "Runtime": ("__init__", "deserialize_cuda_engine"),
    "ICudaEngine": ("num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "get_tensor_shape",
                    "num_optimization_profiles", "get_tensor_profile_shape", "num_layers", "refittable",
                    "device_memory_size_v2", "create_execution_context", "create_engine_inspector", "serialize"),
    "EngineInspector": ("get_engine_information",),
    "IExecutionContext": ("set_optimization_profile_async", "active_optimization_profile", "set_input_shape",
                          "get_tensor_shape", "set_tensor_address", "execute_async_v3"),
    "Refitter": ("__init__", "get_all_weights", "get_missing_weights", "refit_cuda_engine"),
    "OnnxParserRefitter": ("__init__", "refit_from_file", "num_errors", "get_error"),
    "DataType": ("FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "UINT8", "BOOL", "FP8", "name"),
    "TensorIOMode": ("NONE", "INPUT", "OUTPUT"),
    "NetworkDefinitionCreationFlag": ("STRONGLY_TYPED",),
    "BuilderFlag": ("REFIT", "TF32"),
    "MemoryPoolType": ("WORKSPACE",),
    "ProfilingVerbosity": ("LAYER_NAMES_ONLY", "DETAILED"),
    "LayerInformationFormat": ("JSON",),
}

_IMPL = "_standin_impl"  # the key of an object's implementation in its __dict__ (never reachable by attribute)
_TYPE_PREFIXES = ("tensorrt_bindings.tensorrt.", "tensorrt.", "nvinfer1::", "nvonnxparser::")
_ANNOTATION = re.compile(r"(\w+)\s*:\s*([\w.:]+)")


class StandinDriftError(Exception):
    """SOURCE, the behaviour and the real TensorRT bindings disagree."""


def _impl(obj: Any) -> Any:
    return object.__getattribute__(obj, "__dict__").get(_IMPL)


def _attach(obj: Any, impl: Any) -> Any:
    object.__getattribute__(obj, "__dict__")[_IMPL] = impl
    impl._public = obj
    return obj


def _generated(klass: type) -> bool:
    return "__trt_qualname__" in vars(klass)


class _Public:
    """Base of the generated classes: only SOURCE members (and dunders) are reachable on an instance.

    Attributes a Python subclass defines (a logger's own state) stay reachable, like on pybind11 objects.
    """

    def __getattribute__(self, name: str) -> Any:
        cls = type(self)
        if name.startswith("__") or name in cls.__trt_allowed__ or _user_attribute(self, name):
            return object.__getattribute__(self, name)
        raise cls.__trt_standin__.missing(cls.__trt_qualname__, name)

    def __setattr__(self, name: str, value: Any) -> None:
        cls = type(self)
        if not _generated(cls) or isinstance(getattr(cls, name, None), property):
            object.__setattr__(self, name, value)
        else:
            raise cls.__trt_standin__.missing(cls.__trt_qualname__, name)

    def __str__(self) -> str:  # ParserError's str() is TensorRT's one-line description
        impl = _impl(self)
        return str(impl) if impl is not None and "__str__" in vars(type(impl)) else object.__repr__(self)


def _user_attribute(obj: Any, name: str) -> bool:
    """Whether ``name`` belongs to a Python subclass of a generated class (class or instance attribute)."""
    for klass in type(obj).__mro__:
        if _generated(klass):
            return name != _IMPL and name in object.__getattribute__(obj, "__dict__") and klass is not type(obj)
        if name in vars(klass):
            return True
    return False


class _PublicMeta(type):
    def __getattr__(cls, name: str) -> Any:  # class-level misses: trt.DataType.FP4, trt.Builder.reset
        if name.startswith("__"):
            raise AttributeError(name)
        raise cls.__trt_standin__.missing(cls.__trt_qualname__, name, "class")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__call__(*args, **kwargs)
        if _impl(obj) is None:  # pybind11's rule for Python subclasses of its classes
            raise TypeError(f"{cls.__qualname__}.__init__() must be called when overriding __init__")
        return obj


class _Enum(_Public):
    """A pybind11 enum member: int() gives the real value; equal and hashed by identity (members are unique)."""

    def __int__(self) -> int:
        return _impl(self).value

    __index__ = __int__

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{_impl(self).name}: {_impl(self).value}>"

    def __str__(self) -> str:
        return f"{type(self).__name__}.{_impl(self).name}"


class _EnumValue:
    def __init__(self, name: str, value: int) -> None:
        self.name, self.value, self._public = name, value, None


class _Signature:
    """One pybind11 overload: its parameters (without ``self``) and the stand-in class each one is typed with."""

    def __init__(self, text: str) -> None:
        self.text = text
        params = trt_bindings.parameters(text)
        self.params = [p for p in params if p[0] != "self"]
        names = {name for name, _ in self.params}
        inner = text[text.index("(") + 1: text.rindex(")")]
        self.types = {}
        for name, annotation in _ANNOTATION.findall(inner):
            if name in names:
                for prefix in _TYPE_PREFIXES:
                    annotation = annotation.removeprefix(prefix)
                self.types[name] = annotation
        self.variadic = any(name.startswith("*") for name, _ in self.params)

    def binds(self, n_positional: int, keywords: Iterable[str]) -> bool:
        """Whether ``n_positional`` arguments and these keyword names bind to the parameters."""
        if self.variadic:
            return True
        names = [name for name, _ in self.params]
        bound = names[:n_positional]
        if n_positional > len(names) or any(k not in names or k in bound for k in keywords):
            return False
        bound += list(keywords)
        return all(has_default or name in bound for name, has_default in self.params)

    def accepts(self, args: tuple, kwargs: Mapping[str, Any], classes: Mapping[str, type]) -> bool:
        if not self.binds(len(args), kwargs) or self.variadic:
            return self.variadic
        bound = dict(zip([name for name, _ in self.params], args)) | dict(kwargs)
        for name, value in bound.items():
            cls = classes.get(self.types.get(name, ""))
            if cls is not None and not isinstance(value, cls):
                # An enum is passed by value (None refused); other classes by pointer (None allowed).
                if issubclass(cls, _Enum) or value is not None:
                    return False
        return True


_signature = lru_cache(maxsize=None)(_Signature)


def _overloads(texts: list[str]) -> list[_Signature]:
    """A member's overloads (pybind11 lists them after a placeholder ``name(*args, **kwargs)``)."""
    sigs = [_signature(t) for t in texts]
    return [s for s in sigs if not s.variadic] or sigs


class _Standin:
    """What one generated module shares: the API, the record, the public classes; wrapping and checking."""

    def __init__(self, api: dict, record: list | None) -> None:
        self.api, self.version, self.record = api, api["version"], record
        self.classes: dict[str, type] = {}
        self.local = threading.local()  # depth > 0 while the behaviour runs: its calls are not the caller's
        self.module = types.ModuleType("tensorrt", f"TensorRT {self.version} stand-in (tests/engines/tensorrt)")

    # -- errors
    def missing(self, qualname: str, name: str, what: str = "object") -> AttributeError:
        entry = self.api["classes"].get(qualname, {})
        real = {*entry.get("methods", ()), *entry.get("properties", ()), *(entry.get("members") or ()),
                *entry.get("values", ()), *(q.rsplit(".", 1)[1] for q in self.api["classes"] if
                                            q.startswith(qualname + "."))}
        why = ("a real TensorRT member that trt_standin.SOURCE does not list" if name in real
               else "TensorRT has no such member")
        return AttributeError(f"'{qualname}' {what} has no attribute '{name}' (TensorRT {self.version} "
                              f"stand-in: {why})")

    def check(self, qualname: str, member: str, texts: list[str], args: tuple, kwargs: dict) -> None:
        sigs = _overloads(texts)
        if not any(s.accepts(args, kwargs, self.classes) for s in sigs):
            listed = "\n".join(f"    {i}. {s.text}" for i, s in enumerate(sigs, 1))
            raise TypeError(f"{qualname}.{member}(): incompatible function arguments (TensorRT {self.version} "
                            f"stand-in). The following argument types are supported:\n{listed}\n\n"
                            f"Invoked with: args={args!r}, kwargs={kwargs!r}")

    # -- calls
    def note(self, entry: tuple) -> None:
        if self.record is not None and getattr(self.local, "depth", 0) == 0:
            self.record.append(entry)

    def call(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """Run the behaviour on unwrapped arguments; its result as the behaviour returned it."""
        self.local.depth = getattr(self.local, "depth", 0) + 1
        try:
            return fn(*map(self.unwrap, args), **{k: self.unwrap(v) for k, v in kwargs.items()})
        finally:
            self.local.depth -= 1

    def dispatch(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        result = self.call(fn, args, kwargs)
        return [self.wrap(r) for r in result] if isinstance(result, list) else self.wrap(result)

    def unwrap(self, value: Any) -> Any:
        # Loggers and progress monitors stay the caller's objects (the behaviour calls their overrides),
        # IHostMemory stays a buffer, enum members stay members.
        impl = _impl(value) if isinstance(value, _Public) and not isinstance(value, _Enum) else None
        return value if impl is None or impl._trampoline or impl._buffer else impl

    def wrap(self, value: Any) -> Any:
        if not isinstance(value, behaviour.Impl):
            return value
        if value._public is None:
            cls = self.classes.get(type(value).__name__)
            if cls is None:
                raise StandinDriftError(f"the behaviour returned a {type(value).__name__}, which SOURCE lacks")
            obj = cls.__new__(cls, value._data) if value._buffer else object.__new__(cls)
            _attach(obj, value)
        return value._public

    # -- generated members
    def method(self, qualname: str, member: str) -> Callable:
        texts = self.api["classes"][qualname]["methods"][member]
        standin = self

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(self, standin.classes[qualname]) or _impl(self) is None:
                raise TypeError(f"{qualname}.{member}(): self must be an initialised {qualname}, not {self!r}")
            standin.check(qualname, member, texts, args, kwargs)
            standin.note((qualname, member, len(args), tuple(sorted(kwargs))))
            return standin.dispatch(getattr(_impl(self), member), args, kwargs)

        call.__name__, call.__qualname__, call.__doc__ = member, f"{qualname}.{member}", "\n".join(texts)
        return call

    def constructor(self, qualname: str, impl_cls: type | None) -> Callable:
        standin = self
        if impl_cls is None:
            def init(self: Any, *args: Any, **kwargs: Any) -> None:
                raise TypeError(f"tensorrt.{qualname}: No constructor defined!")
            return init
        texts = self.api["classes"][qualname]["methods"]["__init__"]

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            standin.check(qualname, "__init__", texts, args, kwargs)
            standin.note((qualname, "__init__", len(args), tuple(sorted(kwargs))))
            _attach(self, standin.call(lambda *a, **k: impl_cls(standin.module, *a, **k), args, kwargs))
        return init

    def property(self, qualname: str, member: str) -> property:
        readonly = self.api["classes"][qualname]["properties"][member]["readonly"]
        standin = self

        def fget(self: Any) -> Any:
            standin.note((qualname, member, "get"))
            return standin.dispatch(lambda: getattr(_impl(self), member), (), {})

        def fset(self: Any, value: Any) -> None:
            if readonly:
                raise AttributeError(f"{qualname}.{member} is read-only (TensorRT {standin.version})")
            standin.note((qualname, member, "set"))
            standin.dispatch(lambda v: setattr(_impl(self), member, v), (value,), {})

        return property(fget, fset, doc=f"{qualname}.{member} ({'read-only' if readonly else 'read-write'})")

    def allowed(self, members: tuple[str, ...], qualname: str, source: Mapping, bases: tuple) -> frozenset:
        nested = {q.rsplit(".", 1)[1] for q in source if q.startswith(qualname + ".")}
        inherited = set().union(*(b.__trt_allowed__ for b in bases if _generated(b)))
        return frozenset({*members, *nested, *inherited} - {"__init__"})


def _behaviours() -> dict[str, type]:
    return {name: obj for name, obj in vars(behaviour).items()
            if isinstance(obj, type) and issubclass(obj, behaviour.Impl) and not name.startswith("_")
            and obj is not behaviour.Impl}


def _drift(api: dict, source: Mapping[str, tuple[str, ...]]) -> list[str]:
    """What ``source`` names that the real API lacks, and where it and the behaviour disagree."""
    problems, classes = [], api["classes"]
    for qualname, members in source.items():
        if qualname == "<module>":
            for name in members:
                if name == "__version__" and api.get("version"):
                    continue
                if name not in classes:
                    problems.append(f"tensorrt.{name}: not a class of the real bindings (the stand-in "
                                    "simulates classes and __version__ only)")
                elif name not in source:
                    problems.append(f"tensorrt.{name}: a class the module exposes without a SOURCE entry")
            continue
        entry = classes.get(qualname)
        if entry is None:
            problems.append(f"{qualname}: no such class in the real bindings")
            continue
        if "." in qualname and qualname.rsplit(".", 1)[0] not in source:
            problems.append(f"{qualname}: nested in a class without a SOURCE entry")
        real = {*entry["methods"], *entry["properties"], *(entry["members"] or ())}
        problems += [f"{qualname}.{m}: not in the real bindings" for m in members if m not in real]
    impls = _behaviours()
    for qualname, members in source.items():
        if qualname == "<module>" or (classes.get(qualname) or {}).get("members") is not None:
            continue
        impl = impls.get(qualname)
        if impl is None:
            problems.append(f"{qualname}: SOURCE lists it, trt_standin_behaviour has no class for it")
            continue
        defined = {n for n in dir(impl) if not n.startswith("_")}
        problems += [f"{qualname}.{m}: SOURCE lists it, the behaviour does not implement it"
                     for m in members if m != "__init__" and m not in defined]
        problems += _shape_drift(qualname, [m for m in members if m in defined or m == "__init__"],
                                 classes[qualname], impl)
    for qualname, impl in impls.items():  # the behaviour may define no more than the canonical SOURCE
        extra = sorted({n for n in dir(impl) if not n.startswith("_")} - set(SOURCE.get(qualname, ())))
        problems += [f"{qualname}.{m}: the behaviour defines it, SOURCE does not list it" for m in extra]
        if qualname not in SOURCE:
            problems.append(f"{qualname}: the behaviour defines it, SOURCE does not list it")
    return problems


def _shape_drift(qualname: str, members: list[str], entry: dict, impl: type) -> list[str]:
    """Where a behaviour member is not shaped like the real one: a property for a property, a method
    for a method taking the real parameter names (the required ones of some overload), a constructor
    only for a class TensorRT lets Python construct."""
    problems = []
    for m in members:
        if m in entry["properties"]:
            if not isinstance(inspect.getattr_static(impl, m), property):
                problems.append(f"{qualname}.{m}: a property in TensorRT, not in the behaviour")
            continue
        if m not in entry["methods"]:
            continue  # reported: not in the real bindings
        sigs = [_signature(t) for t in entry["methods"][m]]
        if m == "__init__" and all(s.variadic for s in sigs):
            problems.append(f"{qualname}.__init__: TensorRT's Python API cannot construct {qualname}")
            continue
        target = getattr(impl, m)
        if isinstance(inspect.getattr_static(impl, m), property) or not callable(target):
            problems.append(f"{qualname}.{m}: a method in TensorRT, not in the behaviour")
            continue
        params = inspect.signature(target).parameters
        if any(p.kind is p.VAR_KEYWORD or p.kind is p.VAR_POSITIONAL for p in params.values()):
            continue
        if not any(s.variadic or all(n in params for n, has_default in s.params if not has_default)
                   for s in sigs):
            problems.append(f"{qualname}.{m}: the behaviour's parameters {list(params)} are not TensorRT's "
                            f"({' | '.join(s.text for s in sigs)})")
    return problems


def make_standin(api: dict, *, record: list | None = None,
                 source: Mapping[str, tuple[str, ...]] | None = None) -> types.ModuleType:
    """A ``tensorrt`` module for exactly the ``source`` entries (default :data:`SOURCE`) of the real ``api``.

    ``record``: each call is appended as ``(qualname, member, n_positional, sorted keyword names)``, each
    property access as ``(qualname, member, "get" | "set")`` (the caller's only, not the stand-in's own).
    Raises :class:`StandinDriftError` when ``source`` names what the real bindings lack, or when it and
    the behaviour (``trt_standin_behaviour``) disagree.
    """
    source = SOURCE if source is None else source
    problems = _drift(api, source)
    if problems:
        raise StandinDriftError(f"TensorRT {api['version']} stand-in: " + "; ".join(problems))
    standin, impls = _Standin(api, record), _behaviours()
    # Bases first (Logger derives from ILogger), nested classes after their parent (ILogger.Severity).
    order = sorted((q for q in source if q != "<module>"),
                   key=lambda q: (q.count("."), sum(b in source for b in api["classes"][q]["bases"])))
    for qualname in order:
        entry, members = api["classes"][qualname], source[qualname]
        bases = tuple(standin.classes[b] for b in entry["bases"] if b in standin.classes)
        ns: dict[str, Any] = {"__module__": "tensorrt", "__qualname__": qualname, "__trt_qualname__": qualname,
                              "__trt_standin__": standin}
        if entry["members"] is not None:
            ns["__init__"] = standin.constructor(qualname, None)  # members are the enum's only instances
            cls = _PublicMeta(qualname.rsplit(".", 1)[-1], (_Enum,), ns)
            cls.__trt_allowed__ = standin.allowed(members, qualname, source, ())
            if "name" in members:
                cls.name = property(lambda self: _impl(self).name)
            cls.__members__ = {}
            for m in members:
                if m in entry["members"]:
                    value = _attach(object.__new__(cls), _EnumValue(m, entry["members"][m]))
                    type.__setattr__(cls, m, value)
                    cls.__members__[m] = value
        else:
            impl_cls = impls[qualname]
            for m in members:
                if m in entry["properties"]:
                    ns[m] = standin.property(qualname, m)
                elif m != "__init__":
                    ns[m] = standin.method(qualname, m)
            ns["__init__"] = standin.constructor(qualname, impl_cls if "__init__" in members else None)
            base = (bytes,) if impl_cls._buffer else ()  # IHostMemory: the buffer protocol (bytes(), memoryview())
            cls = _PublicMeta(qualname.rsplit(".", 1)[-1], base + (bases or (_Public,)), ns)
            cls.__trt_allowed__ = standin.allowed(members, qualname, source, bases)
        standin.classes[qualname] = cls
        if "." in qualname:
            parent, name = qualname.rsplit(".", 1)
            type.__setattr__(standin.classes[parent], name, cls)
    module = standin.module
    for name in source.get("<module>", ()):
        module.__dict__[name] = api["version"] if name == "__version__" else standin.classes[name]

    def __getattr__(name: str) -> Any:
        real = name in api["classes"] or name in api["functions"]
        why = "a real TensorRT name that trt_standin.SOURCE does not list" if real else "TensorRT has no such name"
        raise AttributeError(f"module 'tensorrt' has no attribute '{name}' (TensorRT {api['version']} stand-in: {why})")

    module.__getattr__ = __getattr__
    return module


def check_call(api: dict, call: tuple) -> str | None:
    """Why the real API ``api`` would refuse a recorded call (None: it accepts it).

    ``call``: a ``record`` entry of :func:`make_standin` (recorded on a stand-in of either version):
    ``(qualname, member, n_positional, keyword names)`` must bind to some overload (argument count and
    keyword names; the values are not recorded); ``(qualname, member, "get" | "set")`` needs the
    property, writable for "set".
    """
    qualname, member, *rest = call
    entry, version = api["classes"].get(qualname), api["version"]
    if entry is None:
        return f"TensorRT {version} has no class {qualname}"
    if rest[0] in ("get", "set"):
        prop = entry["properties"].get(member)
        if prop is None:
            return f"TensorRT {version}: {qualname} has no property {member}"
        return f"TensorRT {version}: {qualname}.{member} is read-only" if rest[0] == "set" and prop["readonly"] \
            else None
    texts = entry["methods"].get(member)
    if texts is None:
        return f"TensorRT {version}: {qualname} has no method {member}"
    sigs = _overloads(texts)
    if any(s.binds(rest[0], rest[1]) for s in sigs):
        return None
    return (f"TensorRT {version}: {qualname}.{member} with {rest[0]} positional argument(s) and keywords "
            f"{list(rest[1])} matches none of: {' | '.join(s.text for s in sigs)}")


def standin_for(major: int, record: list | None = None) -> types.ModuleType | None:
    """The stand-in for TensorRT ``major`` (10 or 11), or None where its bindings are not installed."""
    api = trt_bindings.api(major)
    return None if api is None else make_standin(api, record=record)


__all__ = ["SOURCE", "StandinDriftError", "check_call", "make_standin", "standin_for"]
