"""Load, merge and validate the parameter files; the only code that knows the YAML shape.

params/base.yaml holds the defaults; an application's spec (its tables, its tenant source: the demo's is
params/apps/demo.yaml) extends it; params/<env>.yaml extends the spec and overrides what differs. Mappings
merge key by key, except one tagged `!replace`, which takes the place of the inherited one. Every problem
becomes one line naming the file, the key and the fix, so a release job's log says exactly what to edit;
the loaded Params remember which file set each key, so later errors about a table can say so too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from . import paths
from .errors import ParamsError

ENV_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class ExpectedIdentity(_Strict):
    """What the DSN must lead to: `SELECT current_database()` and `SELECT system_identifier FROM
    pg_control_system()` on the right server."""
    name: str | None = None
    system_identifier: str | None = Field(default=None, pattern=r"^[0-9]+$")


class DatabaseParams(_Strict):
    embedded: bool = False
    name: str = "tenancy_demo"
    dsn_env: str | None = None
    application_name: str = "tenancy-runbook"
    confirm_required: bool = False
    parallel_workers: int = Field(default=0, ge=0, le=16)  # per scan of the runbook's own sessions
    expect: ExpectedIdentity | None = None                   # refuse to run against any other database


class ParentSpec(_Strict):
    table: str                                # a core table whose rows carry the tenant
    column: str                               # this table's column referencing the parent's primary key


class TableSpec(_Strict):
    key: list[str] | None = None
    batch_size: int | None = Field(default=None, gt=0)
    # legacy mapping (legacy.enabled): where a row's org comes from. `parent` wins where both are given
    # (a child must share its parent's tenant); rows with neither get the System Tenant.
    org_column: str | None = None             # a column holding the tenant source's key (legacy.source.tenants.key)
    parent: ParentSpec | None = None          # the tenant of the parent row (e.g. rules -> workflows)


class SystemTenantParams(_Strict):
    name: str = "System Tenant"
    uuid: UUID


class ThrottleParams(_Strict):
    app_stall_ms: int | None = Field(default=50, gt=0)      # slow down while application queries stall this long
    max_pace_ms: int = Field(default=1000, ge=0)            # the longest pause that pacing puts before a batch
    max_lock_waiters: int | None = Field(default=2, ge=0)   # pause while more sessions wait on backfill locks
    max_dead_ratio: float | None = Field(default=None, gt=0)  # pause while dead/live tuples exceed this
    pause_ms: int = Field(default=250, ge=0)
    max_pause_s: float = Field(default=30, ge=0)             # then carry on, and say so
    # the application's budget: the canary's p99 commit latency; a controller sizes and paces the batches to
    # keep it (null: off, batch size from target_batch_ms and pace from app_stall_ms alone)
    budget_p99_ms: float | None = Field(default=50, gt=0)
    max_replica_lag_s: float | None = Field(default=5, gt=0)  # pause while a streaming standby replays this late


class BackfillParams(_Strict):
    batch_size: int = Field(default=10000, gt=0)             # first batch; fixed when target_batch_ms is null
    target_batch_ms: int | None = Field(default=100, gt=0)  # adapt batch size toward this duration
    min_batch_size: int = Field(default=200, gt=0)
    max_batch_size: int = Field(default=100000, gt=0)
    workers: int = Field(default=1, ge=1, le=16)             # parallel workers on disjoint key ranges
    synchronous_commit: bool = True                          # false: batches do not wait for their WAL flush
    pause_ms: int = Field(default=0, ge=0)
    progress_every_s: float = Field(default=5.0, gt=0)
    max_passes: int = Field(default=3, gt=0)
    vacuum_after: bool = True                                # VACUUM (ANALYZE) each table the batches rewrote
    vacuum_every_share: float | None = Field(default=0.05, gt=0, le=1)  # VACUUM beside the batches per this share
    throttle: ThrottleParams = ThrottleParams()


class RetryParams(_Strict):
    attempts: int = Field(default=20, gt=0)        # tries per DDL statement (many short ones)
    backoff_ms: int = Field(default=100, ge=0)     # sleep after the first try; doubles, jittered
    backoff_max_ms: int = Field(default=5000, ge=0)
    jitter: float = Field(default=0.25, ge=0, le=1)


class LockParams(_Strict):
    # the ladder's top rung: no try waits longer than this for its lock (also the session lock_timeout)
    lock_timeout_ms: int = Field(default=500, gt=0)
    # the first try's lock wait; each next try waits twice as long, up to lock_timeout_ms
    first_lock_timeout_ms: int = Field(default=50, gt=0)
    # an anti-wraparound autovacuum on the table is never cancelled: wait this long for it to finish
    wraparound_wait_s: int = Field(default=3600, ge=0)
    # sessions holding locks on the table in a transaction older than this are reported before trying
    report_transactions_older_than_ms: int = Field(default=1000, ge=0)
    statement_timeout_ms: int = Field(default=0, ge=0)
    idle_in_transaction_timeout_ms: int = Field(default=60000, ge=0)
    retry: RetryParams = RetryParams()


class InspectParams(_Strict):
    exact_count_below: int = Field(default=1_000_000, ge=0)
    long_transaction_s: int = Field(default=60, gt=0)


class LintAcceptance(_Strict):
    rule: str
    object: str
    reason: str = Field(min_length=10)


class IsolationAcceptance(_Strict):
    case: str            # e.g. "probe rows created", or as validate prints it: "isolation probe rows created"
    table: str
    reason: str = Field(min_length=10)


class RlsParams(_Strict):
    enabled: bool = False
    # a custom setting name: two lowercase identifiers joined by a dot (it is written into policies)
    setting: str = Field(default="app.current_tenant_id", pattern=r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")
    app_role: str = "app_user"
    legacy_role: str | None = None       # the pre-tenant application's role: what it may see is legacy_access
    legacy_access: Literal["all_tenants", "system_tenant"] = "all_tenants"
    legacy_reason: str | None = Field(default=None, min_length=10)  # why all_tenants is accepted (the lint)
    bypass_roles: list[str] = []         # roles allowed to bypass RLS besides the migration role itself
    lint_accept: list[LintAcceptance] = []
    isolation_accept: list[IsolationAcceptance] = []  # isolation probes that cannot run, reviewed, with why

    @model_validator(mode="after")
    def _legacy_contract(self) -> "RlsParams":
        if self.legacy_role and self.legacy_access == "all_tenants" and not self.legacy_reason:
            raise ValueError("rls.legacy_reason: legacy_access all_tenants lets the legacy role read and write every "
                             "tenant's rows; say why that is accepted (the lint records it), or use system_tenant")
        if self.legacy_role and self.legacy_role == self.app_role:
            raise ValueError("rls.legacy_role: the legacy role must not be the application role, which stays "
                             "isolated per tenant")
        return self


class DistributionParams(_Strict):
    composite_keys: bool = False  # primary keys and foreign keys between tenant tables become (tenant_id, …)
    # 07_distribute (Citus): the application no longer relies on id (or a unique key) alone — every query names
    # tenant_id, no REFERENCES t(id) from outside, no ON CONFLICT (id) — so the primary key and unique keys may
    # become (tenant_id, …); until then the phase stops before its first change
    application_keys_agreed: bool = False
    # tables outside the spec that tenant tables reference (workflows.created_by -> "user"): replicated to every
    # node as reference tables, as tenants, users, user_tenants and the shared tables are
    reference_tables: list[str] = []
    # tenant tables with triggers of the application's: stop (Citus refuses to distribute them), or
    # enable_unsafe (citus.enable_unsafe_triggers for their distribution: Citus creates the trigger on every
    # shard; safe for a trigger that only changes NEW, as an updated_at trigger does)
    triggers: Literal["stop", "enable_unsafe"] = "stop"


class CrossTenantRule(_Strict):
    """What wins on one foreign key between tenant tables whose two sides land in different tenants."""
    wins: Literal["parent", "child", "stop"] = "stop"
    # parent: the child row takes that parent's tenant (the foreign key becomes the table's parent);
    # child: the child keeps its own tenant and the key stays a plain foreign key (no composite twin),
    # an accepted cross-tenant reference; stop: preflight fails while the key has conflicts
    reason: str | None = Field(default=None, min_length=10)  # why a `child` reference is accepted (the lint)

    @model_validator(mode="after")
    def _reasoned(self) -> "CrossTenantRule":
        if self.wins == "child" and not self.reason:
            raise ValueError("cross_tenant.foreign_keys: wins: child keeps a reference across tenants; say why "
                             "(reason:), the lint records it as accepted")
        return self


class CrossTenantParams(_Strict):
    sample_keys: int = Field(default=5, ge=1, le=100)   # keys shown per conflict (the archive's CSV has them too)
    foreign_keys: dict[str, CrossTenantRule] = {}       # "<child table>.<constraint name>" -> its rule

    @field_validator("foreign_keys")
    @classmethod
    def _named(cls, value: dict[str, CrossTenantRule]) -> dict[str, CrossTenantRule]:
        bad = [k for k in value if k.count(".") != 1 or not all(k.split("."))]
        if bad:
            raise ValueError(f"cross_tenant.foreign_keys: {', '.join(bad)}: name each foreign key as "
                             f"<child table>.<constraint name> (01_inspect lists them)")
        return value

    def rule(self, child: str, constraint: str) -> str:
        found = self.foreign_keys.get(f"{child}.{constraint}")
        return found.wins if found else "stop"

    def accepted(self, child: str, constraint: str) -> str | None:
        """The reason a `child` rule gives, or None when the key is not an accepted cross-tenant reference."""
        found = self.foreign_keys.get(f"{child}.{constraint}")
        return found.reason if found and found.wins == "child" else None


class DrizzleParams(_Strict):
    folder: str | None = None                # the application's migrations folder (meta/_journal.json + .sql)
    schema_: str = Field(default="drizzle", alias="schema")
    table: str = "__drizzle_migrations"
    record_after_validate: list[str] = []    # tags whose end state the runbook produces, recorded after validate
    schema_file: str | None = None           # the application's schema.ts: the hand-over is shown as a diff of it


class LegacyRoles(BaseModel):
    """How legacy roles become user_tenants.role. Every key but `order` is a role map named by a membership
    source's role_map (the demo's: org_user, role_ids): legacy values (as text) -> application roles, all
    listed in `order` from least to most privileged. A (user, tenant) pair whose sources disagree gets the
    least privileged of them, and is listed."""
    model_config = ConfigDict(extra="allow", frozen=True)
    order: list[str] = []

    @property
    def maps(self) -> dict[str, dict[str, str]]:
        return {name: {str(k): v for k, v in m.items()} for name, m in (self.model_extra or {}).items()}

    @model_validator(mode="after")
    def _ordered(self) -> "LegacyRoles":
        for name, m in (self.model_extra or {}).items():
            if not isinstance(m, dict) or not all(isinstance(v, str) for v in m.values()):
                raise ValueError(f"legacy.roles.{name}: a role map is a mapping of legacy values to application "
                                 f"roles, e.g. {{editor: member}}")
        unknown = sorted({v for m in self.maps.values() for v in m.values()} - set(self.order))
        if unknown:
            raise ValueError(f"legacy.roles.order: {', '.join(unknown)} mapped but not ranked; list every "
                             f"application role in order, least privileged first")
        if len(set(self.order)) != len(self.order):
            raise ValueError("legacy.roles.order: a role is listed twice")
        return self


class TenantTable(_Strict):
    """The table whose rows become tenants: its integer key (what core tables' org_column holds), a uuid
    column (the tenant's uuid is uuid3(namespace, it)) or null (uuid3(namespace, '<table>:<key>')), the
    column that becomes the name, and optional timestamps (null: now())."""
    table: str
    key: str
    uuid: str | None = None
    name: str
    created_at: str | None = None
    updated_at: str | None = None


class UserTable(_Strict):
    """The table whose rows become users: key, a uuid column the user keeps (null: derived from the key),
    the email (lower-cased and trimmed), an optional display name and timestamps."""
    table: str
    key: str
    uuid: str | None = None
    email: str
    name: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


class MembershipSource(_Strict):
    """(user, tenant) pairs from one table: user and tenant columns holding the user's and the tenant's
    keys (a join table, or a plain column of the user table), or, with arrays, array columns paired by
    position; an optional role column translated through legacy.roles[role_map]."""
    table: str
    user: str
    tenant: str
    role: str | None = None
    role_map: str | None = None
    default_role: str | None = None          # the role of a pair this source names without a role
    arrays: bool = False

    @property
    def label(self) -> str:
        """How listings name the source: the table, or table.role column for arrays (user.role_ids)."""
        return f"{self.table}.{self.role or self.tenant}" if self.arrays else self.table


class TenantSource(_Strict):
    tenants: TenantTable
    users: UserTable
    memberships: list[MembershipSource] = Field(min_length=1)


class LegacyParams(_Strict):
    enabled: bool = False                    # true: the tenant source's rows become tenants, users, memberships
    tenant_uuid_namespace: UUID = UUID("6f1d3a4e-2b7c-4e0a-9c55-1d2e3f405162")  # uuid3(namespace, tenant uuid)
    source: TenantSource | None = None       # the application's tenant source (its spec names it)
    roles: LegacyRoles = LegacyRoles()

    @model_validator(mode="after")
    def _source_and_maps(self) -> "LegacyParams":
        if self.source is None:
            return self
        maps = self.roles.maps
        for i, m in enumerate(self.source.memberships):
            where = f"legacy.source.memberships.{i}"
            if m.role and not m.role_map:
                raise ValueError(f"{where}.role_map: {m.table}.{m.role} holds roles; name the map of legacy.roles "
                                 f"that translates them")
            if m.role_map and m.role_map not in maps:
                raise ValueError(f"{where}.role_map: legacy.roles has no map {m.role_map!r} "
                                 f"(it has {', '.join(maps) or 'none'}); add it or fix the name")
            if m.default_role and m.default_role not in self.roles.order:
                raise ValueError(f"{where}.default_role: {m.default_role!r} is not in legacy.roles.order")
        unused = sorted(set(maps) - {m.role_map for m in self.source.memberships})
        if unused:
            raise ValueError(f"legacy.roles.{unused[0]}: no membership source uses this role map (role_map); "
                             f"remove it or fix its name")
        return self


class SmokeQuery(_Strict):
    name: str
    sql: str
    writes: bool = False  # true: runs in a read-write transaction that is rolled back (e.g. it creates a temp table)


class ValidateParams(_Strict):
    smoke_queries: list[SmokeQuery] = []


class ArchiveParams(_Strict):
    dir: str = "runs"


class DemoParams(_Strict):
    rows: int = Field(default=20000, gt=0)
    seed: int = 42


class Params(_Strict):
    env: str
    extends: str | None = None
    schema_: str = Field(default="public", alias="schema")
    ledger_schema: str = "tenancy_runbook"
    database: DatabaseParams = DatabaseParams()
    system_tenant: SystemTenantParams
    core_tables: dict[str, TableSpec]
    shared_tables: list[str] = []
    backfill: BackfillParams = BackfillParams()
    locks: LockParams = LockParams()
    inspect: InspectParams = InspectParams()
    rls: RlsParams = RlsParams()
    distribution: DistributionParams = DistributionParams()
    cross_tenant: CrossTenantParams = CrossTenantParams()
    drizzle: DrizzleParams = DrizzleParams()
    legacy: LegacyParams = LegacyParams()
    validate_: ValidateParams = Field(default=ValidateParams(), alias="validate")
    archive: ArchiveParams = ArchiveParams()
    demo: DemoParams = DemoParams()
    _origins: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)

    @field_validator("core_tables", mode="before")
    @classmethod
    def _empty_options(cls, value: Any) -> Any:
        # `workflows:` with nothing after it means "no per-table options"
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if not self.core_tables:
            raise ValueError("core_tables: the spec names no core tables; list the tables that get tenant_id")
        both = sorted(set(self.core_tables) & set(self.shared_tables))
        if both:
            raise ValueError(f"shared_tables: {', '.join(both)} also listed in core_tables; a table is one or the other")
        if self.database.embedded and self.database.dsn_env:
            raise ValueError("database.dsn_env: an embedded environment takes no DSN; remove dsn_env or set embedded: false")
        if not self.database.embedded and not self.database.dsn_env:
            raise ValueError(
                "database.dsn_env: a real environment names the environment variable holding its DSN "
                "(e.g. dsn_env: RUNBOOK_STAGING_DSN), or sets embedded: true"
            )
        for name, spec in self.core_tables.items():
            if spec.parent is not None and (spec.parent.table not in self.core_tables or spec.parent.table == name):
                raise ValueError(f"core_tables.{name}.parent: {spec.parent.table!r} is not another core table; a row "
                                 f"takes its tenant from a parent that gets tenant_id too")
        if self.legacy.enabled and self.legacy.source is None:
            raise ValueError("legacy.source: legacy.enabled needs the tenant source (which table defines tenants, "
                             "users and memberships); name it in the application's spec (see params/apps/demo.yaml)")
        if self.legacy.enabled and not self.legacy.roles.order:
            raise ValueError("legacy.roles.order: legacy.enabled needs the application's roles, least privileged "
                             "first")
        return self

    @property
    def tables(self) -> list[str]:
        return list(self.core_tables)

    def origin(self, *loc: str) -> str:
        """The params file that set the key at loc (or its nearest parent key), e.g. params/apps/demo.yaml."""
        return _lookup(self._origins, loc) or f"params/{self.env}.yaml"

    def where(self, *loc: str) -> str:
        """Where a key came from, for an error message: 'params/apps/demo.yaml, core_tables.workflows'."""
        return f"{self.origin(*loc)}, {'.'.join(loc)}"

    def batch_size_for(self, table: str) -> int:
        return self.core_tables[table].batch_size or self.backfill.batch_size

    def public_dict(self) -> dict[str, Any]:
        """The resolved params for manifests and notebooks: holds names of variables, never their values."""
        return self.model_dump(mode="json", by_alias=True)


def available_envs(folder: Path | None = None) -> list[str]:
    folder = folder or paths.params_dir()
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base")


class Replace(dict):
    """A mapping tagged `!replace` in a params file: it takes the place of the inherited mapping."""


class _Loader(yaml.SafeLoader):
    pass


def _replace(loader: yaml.SafeLoader, node: yaml.Node) -> Replace:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, "!replace tags a mapping (lists and values are "
                                                "replaced anyway)", node.start_mark)
    return Replace(loader.construct_mapping(node, deep=True))


_Loader.add_constructor("!replace", _replace)


def _read_yaml(path: Path, label: str) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{label}{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{label}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], override: dict[str, Any], origins: dict[tuple[str, ...], str] | None = None,
           label: str = "", at: tuple[str, ...] = ()) -> dict[str, Any]:
    """override merged into base, mapping by mapping (a `!replace` mapping replaces instead); origins
    (key path -> the file that set it) follows what was taken from where."""
    out = dict(base)
    for key, value in override.items():
        path = at + (key,)
        if isinstance(value, dict) and not isinstance(value, Replace) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origins, label, path)
        else:
            out[key] = dict(value) if isinstance(value, Replace) else value
            if origins is not None:
                for old in [k for k in origins if k[:len(path)] == path]:
                    del origins[old]
                if isinstance(value, dict):
                    _record(origins, value, label, path)
        if origins is not None:
            origins[path] = label
    return out


def _record(origins: dict[tuple[str, ...], str], data: dict[str, Any], label: str, at: tuple[str, ...]) -> None:
    for key, value in data.items():
        origins[at + (key,)] = label
        if isinstance(value, dict):
            _record(origins, value, label, at + (key,))


def _lookup(origins: dict[tuple[str, ...], str], loc: tuple[Any, ...]) -> str | None:
    for depth in range(len(loc), 0, -1):
        label = origins.get(tuple(str(p) if not isinstance(p, str) else p for p in loc[:depth]))
        if label is not None:
            return label
    return None


def _chain(path: Path, folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """The file and everything it extends, most general first."""
    chain: list[tuple[str, dict[str, Any]]] = []
    seen: set[Path] = set()
    current: Path | None = path
    while current is not None:
        label = f"params/{current.relative_to(folder)}"
        if current in seen:
            raise ParamsError(f"{label}: `extends` forms a cycle; make base.yaml the root of the chain")
        seen.add(current)
        data = _read_yaml(current, label)
        chain.insert(0, (label, data))
        parent = data.get("extends")
        if parent is None:
            current = None
            continue
        if not isinstance(parent, str):
            raise ParamsError(f"{label}: extends must be a file name such as base.yaml")
        nxt = (current.parent / parent).resolve()
        if folder.resolve() not in nxt.parents or not nxt.is_file():
            raise ParamsError(f"{label}: extends names {parent!r}, which is not a file in params/; use extends: base.yaml")
        current = nxt
    return chain


def _describe(error: dict[str, Any], origins: dict[tuple[str, ...], str], last: str) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    label = _lookup(origins, loc) or last
    kind = error["type"]
    if kind == "extra_forbidden":
        if loc and loc[-1] == "dsn":
            return (f"{label}: {key}: a DSN never goes in a params file; put it in an environment variable "
                    f"and name that variable with database.dsn_env")
        return f"{label}: unknown key {key!r}; fix its spelling or remove it (see params/base.yaml for the keys)"
    if kind == "missing":
        return f"{label}: {key} is required; add it to this file or to the application spec it extends"
    if kind == "value_error":
        return f"{label}: {error['msg'].removeprefix('Value error, ')}"
    got = error.get("input")
    return f"{label}: {key}: {error['msg'].lower()}, got {got!r}; fix the value"


def load(env: str, folder: Path | None = None) -> Params:
    """The validated params of one environment."""
    folder = folder or paths.params_dir()
    envs = available_envs(folder)
    if not isinstance(env, str) or not ENV_NAME.match(env) or env not in envs:
        raise ParamsError(
            f"unknown env {env!r}: there is no params/{env}.yaml; envs that exist: {', '.join(envs) or '(none)'}"
        )
    chain = _chain(folder / f"{env}.yaml", folder)
    merged: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    for label, data in chain:
        merged = _merge(merged, data, origins, label)
    merged.pop("extends", None)
    if "env" in merged:
        raise ParamsError(f"{origins[('env',)]}: unknown key 'env'; the env is the file's name, remove the key")
    merged["env"] = env
    try:
        loaded = Params.model_validate(merged)
    except ValidationError as exc:
        lines = [_describe(e, origins, chain[-1][0]) for e in exc.errors()]
        raise ParamsError("\n".join(dict.fromkeys(lines))) from None
    loaded._origins = origins
    return loaded


def override(params: Params, changes: dict[str, Any]) -> Params:
    """The same params with some values replaced (a notebook's overrides, a test's smaller ladder)."""
    origins = dict(params._origins)
    merged = _merge(params.model_dump(by_alias=True), changes, origins, "override")
    try:
        changed = Params.model_validate(merged)
    except ValidationError as exc:
        lines = [f"override {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ParamsError("\n".join(lines)) from None
    changed._origins = origins
    return changed


def dsn_from_environment(params: Params) -> str:
    """The DSN of a real environment, read at run time from the variable the params name."""
    var = params.database.dsn_env
    assert var, "embedded environments have no DSN variable"
    value = os.environ.get(var, "").strip()
    if not value:
        raise ParamsError(
            f"params/{params.env}.yaml: database.dsn_env names {var}, which is not set; "
            f"export {var}='postgresql://USER@HOST:5432/DBNAME' (password in ~/.pgpass or in the URL) and run again"
        )
    return value
