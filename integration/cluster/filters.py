"""List requests as the API server reads them: filters, order, select, distinct, paging.

Follows ``services/api/lib/load_param.rb`` and ``record_filters.rb``:

- ``filters`` is a JSON array of ``[attribute, operator, operand]`` (``where``, an object
  of attribute -> value or values, is turned into ``=``/``in`` filters). Operators: ``=``,
  ``!=`` (which also matches null), ``<``, ``<=``, ``>``, ``>=`` (datetimes compared as
  times), ``like``/``ilike`` (``%``, ``_``, backslash escapes), ``in``, ``not in`` (also
  matches null), ``is_a`` (on ``uuid`` it selects the whole table or nothing; on other
  uuid attributes it tests the uuid's type infix, so remote uuids match), ``exists`` and
  ``contains`` on Hash/Array attributes, and ``properties.<key>`` subproperty filters.
  An unknown attribute is 422 "Invalid attribute 'x' in filter"; a bad operand 422.
- ``order``: ``"attr [asc|desc]"`` items (a JSON array or a comma-separated string);
  unknown attributes are silently dropped, then the defaults ``modified_at desc, uuid
  desc`` are appended and everything after ``uuid`` (unique) is cut. Nulls sort last
  ascending and first descending, as in PostgreSQL.
- ``limit`` (default 100, capped at the cluster's ``MaxItemsPerResponse``), ``offset``,
  ``count`` (``exact`` adds ``items_available``; ``none`` does not), ``select`` (unknown
  names are 422; the answer keeps ``kind`` and ``etag`` too, as the Go controller's
  ``applySelectParam`` does; ``writable_by`` only when selected, since Rails does not
  send it) and ``distinct`` (unique rows of the selected attributes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import ApiFailure
from .records import INFIXES, KIND_INFIX, parse_time

DEFAULT_LIMIT = 100
Predicate = Callable[[dict], bool]
_TRUE = ("1", "t", "true", "y", "yes")
_FALSE = ("0", "f", "false", "n", "no")
_ORDER_RE = re.compile(r"^(?:([a-z][_a-z0-9]+)\.)?([a-z][_a-z0-9]+)$")


@dataclass
class ListOptions:
    filters: list = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    select: list[str] | None = None
    limit: int | None = None  # None: not given (the Go controller's -1)
    offset: int = 0
    count: str = "exact"
    distinct: bool = False
    include_trash: bool = False
    include_old_versions: bool = False
    cluster_id: str = ""
    bypass_federation: bool = False
    forwarded_for: str = ""
    include: set[str] = field(default_factory=set)


def json_value(params: dict, name: str, default=None):
    if name not in params or params[name] == "":
        return default
    value = params[name]
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise ApiFailure(422, f'Could not parse "{name}" param as JSON') from None


def boolean(params: dict, name: str) -> bool:
    value = params.get(name)
    if isinstance(value, bool):
        return value
    return str(value).lower() in _TRUE


def list_options(params: dict) -> ListOptions:
    filters = json_value(params, "filters", [])
    if filters is None:
        filters = []
    if not isinstance(filters, list):
        raise ApiFailure(422, 'Could not parse "filters" param as an array')
    where = json_value(params, "where", {})
    if not isinstance(where, dict):
        raise ApiFailure(422, 'Could not parse "where" param as an object')
    filters = list(filters) + [[k, "in" if isinstance(v, list) else "=", v] for k, v in where.items()]
    opts = ListOptions(filters=filters)
    raw_order = params.get("order")
    if isinstance(raw_order, str) and raw_order.startswith("["):
        raw_order = json_value(params, "order", [])
    if isinstance(raw_order, str):
        raw_order = [o for o in raw_order.split(",") if o.strip()]
    opts.order = [str(o) for o in raw_order or []]
    select = json_value(params, "select", None)
    if select is not None and not (isinstance(select, list) and all(isinstance(s, str) for s in select)):
        raise ApiFailure(422, 'Could not parse "select" param as an array')
    opts.select = select
    for name in ("limit", "offset"):
        value = params.get(name)
        if value is None or value == "":
            continue
        if not re.fullmatch(r"\d+", str(value)):
            raise ApiFailure(422, f"Invalid value for {name} parameter")
        setattr(opts, name, int(value))
    opts.count = params.get("count") or "exact"
    if opts.count not in ("exact", "none"):
        raise ApiFailure(422, "count parameter must be 'exact' or 'none'")
    opts.distinct = boolean(params, "distinct")
    opts.include_trash = boolean(params, "include_trash")
    opts.include_old_versions = boolean(params, "include_old_versions")
    opts.bypass_federation = boolean(params, "bypass_federation")
    opts.cluster_id = params.get("cluster_id") or ""
    opts.forwarded_for = params.get("forwarded_for") or ""
    include = params.get("include")
    if isinstance(include, str) and include.startswith("["):
        include = json_value(params, "include", [])
    if isinstance(include, str):
        include = [include] if include else []
    if not isinstance(include, list | type(None)):
        raise ApiFailure(422, "'include' parameter must be a string or array")
    opts.include = set(include or [])
    return opts


# --- filters --------------------------------------------------------------------------------


def matcher(filters: list, table: str, fields: dict[str, str]) -> Predicate:
    """One predicate for all `filters` on records of `table` (whose attribute types are `fields`)."""
    predicates = [_predicate(f, table, fields) for f in filters]
    return lambda record: all(p(record) for p in predicates)


def _predicate(f: object, table: str, fields: dict[str, str]) -> Predicate:
    if not isinstance(f, list) or len(f) != 3:
        raise ApiFailure(422, f"Invalid element in filters array: {json.dumps(f)} is not an array of 3")
    attr, op, operand = f
    if not isinstance(op, str):
        raise ApiFailure(422, f"Invalid operator '{op}' ({type(op).__name__}) in filter")
    if not isinstance(attr, str):
        raise ApiFailure(422, f"Invalid attribute '{attr}' in filter")
    op = op.lower()
    column, _, prop = attr.partition(".")
    if prop:
        if fields.get(column) != "Hash":
            raise ApiFailure(422, f"Invalid attribute '{column}' for subproperty filter")
        return _subproperty(column, prop.removeprefix("<").removesuffix(">"), op, operand)
    if op == "exists":
        if fields.get(column) != "Hash":
            raise ApiFailure(422, f"Invalid attribute '{column}' for operator '{op}' in filter")
        return lambda r: isinstance(r.get(column), dict) and operand in r[column]
    if column not in fields:
        raise ApiFailure(422, f"Invalid attribute '{column}' in filter")
    kind = fields[column]
    if op in ("=", "!=", "<", "<=", ">", ">=", "like", "ilike"):
        return _comparison(column, kind, op, operand)
    if op in ("in", "not in"):
        if not isinstance(operand, list):
            raise ApiFailure(
                422, f"Invalid operand type '{type(operand).__name__}' for '{op}' operator in filters"
            )
        values = [_coerce(kind, v) for v in operand]
        if op == "in":
            return lambda r: r.get(column) in values
        return lambda r: r.get(column) is None or r.get(column) not in values
    if op == "is_a":
        kinds = operand if isinstance(operand, list) else [operand]
        infixes = {KIND_INFIX.get(k) for k in kinds} - {None}
        if column == "uuid":
            whole = any(INFIXES[i][1] == table for i in infixes)
            return lambda r: whole
        return lambda r: isinstance(r.get(column), str) and r[column][6:11] in infixes
    if op == "contains":
        if kind not in ("Hash", "Array") or operand == []:
            raise ApiFailure(422, f"Invalid attribute '{column}' for '{op}' operator")
        wanted = operand if isinstance(operand, list) else [operand]
        return lambda r: all(w in (r.get(column) or ()) for w in wanted)
    raise ApiFailure(422, f"Invalid operator '{op}'")


def _coerce(kind: str, value: object) -> object:
    if kind == "integer" and value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ApiFailure(422, f"Invalid element '{value}' in array for integer attribute")
    return value


def _comparison(column: str, kind: str, op: str, operand: object) -> Predicate:
    if isinstance(operand, str):
        if kind == "boolean":
            if op not in ("=", "!="):
                raise ApiFailure(422, f"Invalid operator '{op}' for boolean attribute '{column}'")
            if operand.lower() not in _TRUE + _FALSE:
                raise ApiFailure(422, f"Invalid operand '{operand}' for boolean attribute '{column}'")
            operand = operand.lower() in _TRUE
        elif op in ("like", "ilike"):
            pattern = _like(operand, op == "ilike")
            return lambda r: isinstance(r.get(column), str) and pattern.fullmatch(r[column]) is not None
        elif kind == "datetime" and op in ("=", "<", "<=", ">", ">="):
            try:
                moment = parse_time(operand)
            except ValueError:
                raise ApiFailure(422, f"Invalid time '{operand}' for '{column}'") from None
            return _compare(lambda r: parse_time(r[column]) if r.get(column) else None, op, moment)
    elif operand is None and op in ("=", "!="):
        return (lambda r: r.get(column) is None) if op == "=" else (lambda r: r.get(column) is not None)
    elif kind == "boolean" and op in ("=", "!=") and isinstance(operand, bool):
        pass
    elif (
        kind == "integer"
        and isinstance(operand, int)
        and not isinstance(operand, bool)
        and op not in ("like", "ilike")
    ):
        pass
    else:
        raise ApiFailure(
            422, f"Invalid operand type '{type(operand).__name__}' for '{op}' operator in filters"
        )
    if op == "!=":
        return lambda r: r.get(column) is None or r.get(column) != operand
    return _compare(lambda r: r.get(column), op, operand)


def _compare(get: Callable[[dict], object], op: str, operand: object) -> Predicate:
    def test(record: dict) -> bool:
        value = get(record)
        if value is None:
            return False
        try:
            if op == "=":
                return value == operand
            if op == "<":
                return value < operand
            if op == "<=":
                return value <= operand
            if op == ">":
                return value > operand
            return value >= operand
        except TypeError:
            return False

    return test


def _like(pattern: str, ignore_case: bool) -> re.Pattern:
    out, escaped = [], False
    for ch in pattern:
        if escaped:
            out.append(re.escape(ch))
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "%":
            out.append(".*")
        elif ch == "_":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _subproperty(column: str, key: str, op: str, operand: object) -> Predicate:
    def value(record: dict) -> object:
        props = record.get(column)
        return props.get(key) if isinstance(props, dict) else None

    def has(record: dict) -> bool:
        props = record.get(column)
        return isinstance(props, dict) and key in props

    if op == "=":
        return lambda r: has(r) and value(r) == operand
    if op == "!=":
        return lambda r: not (has(r) and value(r) == operand)
    if op in ("in", "not in"):
        if not isinstance(operand, list):
            raise ApiFailure(
                422, f"Invalid operand type '{type(operand).__name__}' for '{op}' operator in filters"
            )
        if op == "in":
            return lambda r: has(r) and value(r) in operand
        return lambda r: not has(r) or value(r) not in operand
    if op in ("<", "<=", ">", ">="):
        return _compare(value, op, operand)
    if op in ("like", "ilike"):
        pattern = _like(str(operand), op == "ilike")
        return lambda r: isinstance(value(r), str) and pattern.fullmatch(value(r)) is not None
    if op == "exists":
        if operand not in (True, False):
            raise ApiFailure(422, f"Invalid operand '{operand}' for '{op}' must be true or false")
        return lambda r: has(r) == operand
    if op == "contains":
        return lambda r: value(r) == operand or (isinstance(value(r), list) and operand in value(r))
    raise ApiFailure(422, f"Invalid operator for subproperty search '{op}'")


# --- order, paging, select ------------------------------------------------------------------


def order_specs(orders: Iterable[str], table: str, fields: dict[str, str]) -> list[tuple[str, bool]]:
    """[(attribute, descending)] as optimize_orders leaves them (defaults appended, cut at uuid)."""
    specs: list[tuple[str, bool]] = []
    for order in orders:
        attr, _, direction = order.strip().partition(" ")
        direction = (direction.strip() or "asc").lower()
        m = _ORDER_RE.match(attr)
        if not m or direction not in ("asc", "desc") or (m.group(1) and m.group(1) != table):
            continue
        if m.group(2) in fields:
            specs.append((m.group(2), direction == "desc"))
    out: list[tuple[str, bool]] = []
    for attr, desc in specs + [("modified_at", True), ("uuid", True)]:
        if attr in (a for a, _ in out):
            continue
        out.append((attr, desc))
        if attr == "uuid":
            break
    return out


def sort_records(records: list[dict], specs: list[tuple[str, bool]]) -> list[dict]:
    out = list(records)
    for attr, desc in reversed(specs):
        out.sort(key=lambda r: _sort_key(r.get(attr)), reverse=desc)
    return out


def _sort_key(value: object) -> tuple:
    if value is None:
        return (True, "")
    if isinstance(value, dict | list):
        return (False, json.dumps(value, sort_keys=True))
    return (False, value)


def effective_limit(opts: ListOptions, max_items: int) -> int:
    return min(DEFAULT_LIMIT if opts.limit is None else opts.limit, max_items)


def check_select(select: list[str] | None, fields: Iterable[str], what: str) -> None:
    known = set(fields)
    for name in select or ():
        if name not in known:
            raise ApiFailure(422, f"Invalid attribute '{name}' of {what} in select parameter")


def selected(record: dict, select: list[str] | None) -> dict:
    if select is None:
        return record
    out = {k: record[k] for k in select if k in record}
    for k in ("etag", "kind"):
        if k in record:
            out[k] = record[k]
    return out


def distinct_rows(items: list[dict], select: list[str] | None) -> list[dict]:
    seen, out = set(), []
    for item in items:
        key = json.dumps([item.get(k) for k in (select or sorted(item))], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def list_body(kind: str, items: list[dict], opts: ListOptions, limit: int, available: int) -> dict:
    body = {"kind": kind, "etag": "", "self_link": "", "offset": opts.offset, "limit": limit, "items": items}
    if opts.count != "none":
        body["items_available"] = available
    return body


def list_page(
    rows: Iterable[dict],
    table: str,
    fields: dict[str, str],
    opts: ListOptions,
    max_items: int,
    present: Callable[[dict], dict],
    what: str,
) -> dict:
    """The list answer for `rows` (already filtered for permission): filtered, ordered, paged."""
    check_select(opts.select, fields, what)
    predicate = matcher(opts.filters, table, fields)
    matched = sort_records([r for r in rows if predicate(r)], order_specs(opts.order, table, fields))
    limit = effective_limit(opts, max_items)
    if opts.distinct:
        rows = distinct_rows([selected(present(r), opts.select) for r in matched], opts.select)
        page, available = rows[opts.offset : opts.offset + limit], len(rows)
    else:
        page = [selected(present(r), opts.select) for r in matched[opts.offset : opts.offset + limit]]
        available = len(matched)
    return list_body(f"arvados#{what[0].lower()}{what[1:]}List", page, opts, limit, available)
