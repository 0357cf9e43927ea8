//! The sandbox every recipe runs in: resource limits, no `eval`, and imports
//! that resolve only inside the recipe's own folder and the `recipes/` folder.
//! Rhai's standard packages have no file or network access, so the API's
//! declared paths (data folders, weights) are the only ones a script names.
//!
//! Rhai checks a container's size when a function returns it or changes it
//! in place, but not when an assignment through an index or property adds a
//! map key or swaps an element for a bigger one (`m[k] = v`, `a[i] = big`),
//! nor when a method changes a container nested in another
//! (`m.list.push(v)`), and it counts neither map keys nor the values a
//! closure holds. So the variables a script changes in those ways
//! ([`Watched`]) are measured again, in full, each time they are read: such
//! a container passes a limit by one step at most, and the step after fails.
//! Memory that no size limit counts (API objects, many variables, deep
//! recursion) is caught by [`memory`], which watches the resident size.

use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rhai::{
    AST, ASTNode, Array, Blob, Dynamic, Engine, EvalAltResult, EvalContext, Expr, FnPtr, INT,
    ImmutableString, Map, Module, ModuleResolver, NativeCallContext, ParseErrorType, Position,
    Scope, Stmt,
};

// Rhai's shared pointer under the `sync` feature.
type SharedModule = Arc<Module>;

/// Limits of a recipe evaluation. Planning a sweep is cheap, so these are
/// generous; they exist to stop runaway scripts, not to meter normal ones.
pub mod limits {
    pub const OPERATIONS: u64 = 50_000_000;
    /// Per call of a script schedule (called every training step).
    pub const SCHEDULE_OPERATIONS: u64 = 1_000_000;
    pub const CALL_LEVELS: usize = 64;
    pub const EXPR_DEPTH: usize = 64;
    pub const FN_EXPR_DEPTH: usize = 32;
    /// Bytes of one string, or of all the strings (map keys included) in
    /// one array or map.
    pub const STRING_SIZE: usize = 1 << 20;
    /// Items of one array, nested arrays and BLOB bytes included.
    pub const ARRAY_SIZE: usize = 100_000;
    /// Entries of one map, nested maps included.
    pub const MAP_SIZE: usize = 10_000;
    pub const MODULES: usize = 64;
    /// Growth of the process's resident memory while a recipe evaluates,
    /// model checks and training excluded.
    pub const MEMORY: usize = 128 << 20;
}

/// Whether an engine runs recipes (its operation limit is per recipe) or
/// schedules (per call); messages name the limit that applies.
const fn operations_scope(operations: u64) -> &'static str {
    if operations == limits::SCHEDULE_OPERATIONS {
        "per schedule call"
    } else {
        "per recipe"
    }
}

/// The one-line message of an error that is a sandbox limit, naming the
/// limit and its value; `None` for any other error.
pub(crate) fn limit_message(mut err: &EvalAltResult, operations: u64) -> Option<String> {
    while let EvalAltResult::ErrorInFunctionCall(.., inner, _)
    | EvalAltResult::ErrorInModule(_, inner, _) = err
    {
        err = inner;
    }
    Some(match err {
        EvalAltResult::ErrorDataTooLarge(what, _) if what.starts_with("Length of string") => {
            format!(
                "string size limit exceeded: a string, or all the strings and map keys in one array or map, may hold at most {} bytes",
                limits::STRING_SIZE
            )
        }
        EvalAltResult::ErrorDataTooLarge(what, _) if what.contains("map") => format!(
            "map size limit exceeded: a map may hold at most {} entries, those of nested maps included",
            limits::MAP_SIZE
        ),
        EvalAltResult::ErrorDataTooLarge(..) => format!(
            "array size limit exceeded: an array may hold at most {} items, those of nested arrays and BLOBs included",
            limits::ARRAY_SIZE
        ),
        EvalAltResult::ErrorTooManyOperations(_) => format!(
            "operation limit exceeded: at most {operations} operations {}",
            operations_scope(operations)
        ),
        EvalAltResult::ErrorStackOverflow(_) => format!(
            "call depth limit exceeded: calls may nest at most {} deep",
            limits::CALL_LEVELS
        ),
        EvalAltResult::ErrorTooManyModules(_) => format!(
            "module limit exceeded: at most {} modules may be imported",
            limits::MODULES
        ),
        EvalAltResult::ErrorTerminated(token, _) if memory::is_token(token) => format!(
            "memory limit exceeded: evaluating the recipe may grow the process by at most {} MiB",
            limits::MEMORY >> 20
        ),
        _ => return None,
    })
}

/// As [`limit_message`], for the limits the compiler checks.
pub(crate) fn parse_limit_message(err: &ParseErrorType) -> Option<String> {
    match err {
        ParseErrorType::ExprTooDeep => Some(format!(
            "expression depth limit exceeded: expressions may nest at most {} deep, {} inside functions",
            limits::EXPR_DEPTH,
            limits::FN_EXPR_DEPTH
        )),
        _ => None,
    }
}

/// An engine with the sandbox's limits and strictness, and no module
/// resolver (imports fail) until a caller sets one.
/// Every AST it runs must be added to `watched` before it runs.
pub(crate) fn engine(operations: u64, watched: &Watched) -> Engine {
    let mut e = base(operations);
    let watched = watched.clone();
    #[allow(deprecated)] // Rhai marks `on_var` volatile, not deprecated.
    e.on_var(move |name, _, ctx| check_variable(&watched, name, ctx).map(|()| None));
    e.on_progress(|ops| {
        // Reading the clock every operation would cost more than the check.
        (ops % 16 == 0 && memory::exceeded()).then(memory::token)
    });
    e.register_fn("pad", pad_array);
    e
}

/// The limits and strictness alone: the engine the editor stub describes,
/// without [`engine`]'s replacement of a standard function.
pub(crate) fn base(operations: u64) -> Engine {
    let mut e = Engine::new();
    e.set_max_operations(operations)
        .set_max_call_levels(limits::CALL_LEVELS)
        .set_max_expr_depths(limits::EXPR_DEPTH, limits::FN_EXPR_DEPTH)
        .set_max_string_size(limits::STRING_SIZE)
        .set_max_array_size(limits::ARRAY_SIZE)
        .set_max_map_size(limits::MAP_SIZE)
        .set_max_modules(limits::MODULES)
        // Typos in variable names fail at compile time, with a position.
        .set_strict_variables(true)
        .set_fail_on_invalid_map_property(true)
        .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    e.disable_symbol("eval");
    e
}

/// The variables a script changes where Rhai does not check the size: the
/// roots of assignments through an index or property, and of method calls
/// on a nested container; `this` where a method does either to it. Names
/// are collected over every AST of an evaluation, whatever the function,
/// so a name may be measured where it did not need to be, never the reverse.
#[derive(Clone, Default)]
pub(crate) struct Watched(Arc<WatchedInner>);

#[derive(Default)]
struct WatchedInner {
    /// Most scripts change no variable that way: every read then skips the
    /// lock.
    any: AtomicBool,
    names: RwLock<WatchedNames>,
}

#[derive(Default)]
struct WatchedNames {
    names: HashSet<ImmutableString>,
    this: bool,
}

enum Root {
    Name(ImmutableString),
    This,
}

impl Watched {
    pub fn add(&self, ast: &AST) {
        let mut roots = Vec::new();
        ast.walk(&mut |path: &[ASTNode]| {
            match path.last() {
                Some(ASTNode::Stmt(Stmt::Assignment(x))) => roots.extend(chain_root(&x.1.lhs)),
                Some(ASTNode::Expr(e)) if changes_nested(e) => roots.extend(chain_root(e)),
                _ => {}
            }
            true
        });
        if roots.is_empty() {
            return;
        }
        let mut w = self.0.names.write().unwrap_or_else(|e| e.into_inner());
        self.0.any.store(true, Ordering::Relaxed);
        for r in roots {
            match r {
                Root::Name(n) => {
                    w.names.insert(n);
                }
                Root::This => w.this = true,
            }
        }
    }

    /// Whether `name`, and whether `this`, are watched.
    fn get(&self, name: &str) -> (bool, bool) {
        if !self.0.any.load(Ordering::Relaxed) {
            return (false, false);
        }
        let w = self.0.names.read().unwrap_or_else(|e| e.into_inner());
        (w.names.contains(name), w.this)
    }
}

/// The variable an index or property chain starts from; `None` for a
/// chain on a temporary value.
fn chain_root(e: &Expr) -> Option<Root> {
    match e {
        Expr::Dot(x, ..) | Expr::Index(x, ..) => match &x.lhs {
            Expr::Variable(v, ..) => Some(Root::Name(v.1.clone())),
            Expr::ThisPtr(..) => Some(Root::This),
            _ => None,
        },
        _ => None,
    }
}

/// Whether a chain calls a method below its first link (`x.a.push(v)`,
/// `x[i].push(v)`): Rhai then checks the nested container, not `x`. A method
/// called on `x` itself (`x.push(v)`) is checked.
fn changes_nested(e: &Expr) -> bool {
    fn calls(e: &Expr) -> bool {
        match e {
            Expr::MethodCall(..) => true,
            Expr::Dot(x, ..) | Expr::Index(x, ..) => calls(&x.lhs) || calls(&x.rhs),
            _ => false,
        }
    }
    match e {
        Expr::Dot(x, ..) => !matches!(x.rhs, Expr::MethodCall(..)) && calls(&x.rhs),
        Expr::Index(x, ..) => calls(&x.rhs),
        _ => false,
    }
}

/// Items scanned per operation charged: measuring is far cheaper than an
/// operation, but must still count, or re-reading one big watched
/// container in a loop would run far longer than the operation limit means
/// to allow.
const SCANNED_PER_OPERATION: u64 = 32;

/// Measures a watched variable about to be read, and `this` in a method
/// that changes it, in full.
fn check_variable(
    watched: &Watched,
    name: &str,
    mut ctx: EvalContext,
) -> Result<(), Box<EvalAltResult>> {
    let (name_watched, this_watched) = watched.get(name);
    if !name_watched && !this_watched {
        return Ok(());
    }
    let max = Sizes::max(ctx.engine());
    let mut scanned = 0;
    let mut result = Ok(());
    if let Some(v) = ctx.scope().get(name).filter(|_| name_watched) {
        result = Sizes::default().add(v, &max, &mut scanned);
    }
    if let (Ok(()), Some(this)) = (&result, ctx.this_ptr().filter(|_| this_watched)) {
        result = Sizes::default().add(this, &max, &mut scanned);
    }
    ctx.global_runtime_state_mut().num_operations += scanned / SCANNED_PER_OPERATION;
    result.map_err(|what| {
        Box::new(EvalAltResult::ErrorDataTooLarge(
            what.into(),
            Position::NONE,
        ))
    })
}

/// What a value holds, counted as the limits count it.
#[derive(Default, Clone, Copy)]
struct Sizes {
    items: usize,
    entries: usize,
    bytes: usize,
}

impl Sizes {
    fn max(engine: &Engine) -> Sizes {
        let or_max = |n: usize| if n == 0 { usize::MAX } else { n };
        Sizes {
            items: or_max(engine.max_array_size()),
            entries: or_max(engine.max_map_size()),
            bytes: or_max(engine.max_string_size()),
        }
    }

    /// Adds what `v` holds, stopping at the first limit passed with the
    /// name Rhai gives that limit.
    fn add(&mut self, v: &Dynamic, max: &Sizes, scanned: &mut u64) -> Result<(), &'static str> {
        *scanned += 1;
        if v.is_shared() {
            // A closure's captured variable; one locked by the statement
            // being evaluated is measured when next read.
            return match v.read_lock::<Dynamic>() {
                Some(inner) => self.add(&inner, max, scanned),
                None => Ok(()),
            };
        }
        let t = v.type_id();
        if t == TypeId::of::<Array>() {
            if let Some(a) = v.read_lock::<Array>() {
                self.add_array(&a, max, scanned)?;
            }
        } else if t == TypeId::of::<Map>() {
            let Some(m) = v.read_lock::<Map>() else {
                return Ok(());
            };
            self.entries += m.len();
            self.within(max)?;
            for (k, x) in m.iter() {
                self.bytes += k.len();
                self.add(x, max, scanned)?;
            }
        } else if t == TypeId::of::<ImmutableString>() {
            self.bytes += v.read_lock::<ImmutableString>().map_or(0, |s| s.len());
        } else if t == TypeId::of::<Blob>() {
            self.items += v.read_lock::<Blob>().map_or(0, |b| b.len());
        } else if t == TypeId::of::<FnPtr>() {
            let Some(f) = v.read_lock::<FnPtr>() else {
                return Ok(());
            };
            for x in f.iter_curry() {
                self.add(x, max, scanned)?;
            }
        }
        self.within(max)
    }

    fn add_array(&mut self, a: &Array, max: &Sizes, scanned: &mut u64) -> Result<(), &'static str> {
        self.items += a.len();
        self.within(max)?;
        a.iter().try_for_each(|x| self.add(x, max, scanned))
    }

    fn within(&self, max: &Sizes) -> Result<(), &'static str> {
        if self.bytes > max.bytes {
            Err("Length of string")
        } else if self.items > max.items {
            Err("Size of array/BLOB")
        } else if self.entries > max.entries {
            Err("Size of object map")
        } else {
            Ok(())
        }
    }
}

/// `array.pad(len, item)`, replacing Rhai's, whose size check overflows
/// (a panic, or a wrapped check and an abort) for a huge `len` and an item
/// that is itself a container or a string.
fn pad_array(
    ctx: NativeCallContext,
    array: &mut Array,
    len: INT,
    item: Dynamic,
) -> Result<(), Box<EvalAltResult>> {
    let Ok(len) = usize::try_from(len) else {
        return Ok(());
    };
    if len <= array.len() {
        return Ok(());
    }
    let max = Sizes::max(ctx.engine());
    let mut scanned = 0;
    let too_large = |what: &str| {
        Box::new(EvalAltResult::ErrorDataTooLarge(
            what.into(),
            Position::NONE,
        ))
    };
    let mut now = Sizes::default();
    now.add_array(array, &max, &mut scanned)
        .map_err(too_large)?;
    let mut one = Sizes::default();
    one.add(&item, &max, &mut scanned).map_err(too_large)?;
    let copies = len - array.len();
    let total = Sizes {
        items: now
            .items
            .saturating_add(copies.saturating_mul(one.items + 1)),
        entries: now
            .entries
            .saturating_add(copies.saturating_mul(one.entries)),
        bytes: now.bytes.saturating_add(copies.saturating_mul(one.bytes)),
    };
    total.within(&max).map_err(too_large)?;
    array.resize(len, item);
    Ok(())
}

/// The backstop for memory no size limit counts: while a recipe evaluates,
/// the process's resident size may grow by at most [`limits::MEMORY`].
/// Growth while Rust code builds models or trains is not the recipe's and
/// is left out. The budget is per thread, so schedules evaluated while a
/// recipe plans are held to it, and schedules evaluated in training are not.
/// Where `/proc` cannot be read, nothing is checked.
pub(crate) mod memory {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    use rhai::Dynamic;

    use super::limits;

    /// How often, at most, the resident size is read: a script copying
    /// memory as fast as it can gains a few MiB in that time, and a read
    /// costs a few microseconds.
    const EVERY: Duration = Duration::from_millis(1);

    /// Tells the memory limit's termination apart from other terminations.
    const TOKEN: &str = "kd-recipes: memory limit";

    #[derive(Clone, Copy)]
    struct Budget {
        /// Resident KiB that are not the recipe's: those at the start, plus
        /// the growth while excluded.
        baseline: i64,
        paused: u32,
        last: Instant,
    }

    thread_local! {
        static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
    }

    /// Holds this thread's evaluation to the budget until dropped.
    pub(crate) struct Active {
        previous: Option<Budget>,
    }

    impl Drop for Active {
        fn drop(&mut self) {
            BUDGET.set(self.previous);
        }
    }

    pub(crate) fn activate() -> Active {
        let previous = BUDGET.get();
        if let Some(baseline) = resident_kib() {
            BUDGET.set(Some(Budget {
                baseline,
                paused: 0,
                last: Instant::now(),
            }));
        }
        Active { previous }
    }

    /// Runs `f` (model checks, training) without counting what it
    /// allocates against the budget.
    pub(crate) fn excluding<T>(f: impl FnOnce() -> T) -> T {
        let before = BUDGET.get().and_then(|_| resident_kib());
        update(|b| b.paused += 1);
        let out = f();
        let grown = before.zip(resident_kib()).map_or(0, |(b, a)| a - b);
        update(|b| {
            b.paused -= 1;
            b.baseline += grown;
            b.last = Instant::now();
        });
        out
    }

    fn update(f: impl FnOnce(&mut Budget)) {
        if let Some(mut b) = BUDGET.get() {
            f(&mut b);
            BUDGET.set(Some(b));
        }
    }

    /// Whether this thread's evaluation is over budget; reads the resident
    /// size at most every [`EVERY`].
    pub(crate) fn exceeded() -> bool {
        let Some(mut b) = BUDGET.get() else {
            return false;
        };
        if b.paused > 0 || b.last.elapsed() < EVERY {
            return false;
        }
        b.last = Instant::now();
        BUDGET.set(Some(b));
        resident_kib().is_some_and(|now| now - b.baseline > (limits::MEMORY >> 10) as i64)
    }

    pub(crate) fn token() -> Dynamic {
        TOKEN.into()
    }

    pub(crate) fn is_token(token: &Dynamic) -> bool {
        token
            .read_lock::<rhai::ImmutableString>()
            .is_some_and(|s| s.as_str() == TOKEN)
    }

    /// The process's resident size, in KiB.
    fn resident_kib() -> Option<i64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }
}

/// A script file the evaluation has read: the recipe or an imported module.
pub(crate) struct SourceFile {
    /// The path as shown in messages; also the Rhai source name.
    pub id: String,
    pub text: Arc<str>,
    pub ast: rhai::AST,
}

/// Every file of one evaluation, so that a schedule function can be saved
/// with the text of the file that defines it.
#[derive(Default)]
pub(crate) struct Sources(Mutex<Vec<Arc<SourceFile>>>);

impl Sources {
    pub fn add(&self, id: &str, text: Arc<str>, ast: &rhai::AST) {
        let file = SourceFile {
            id: id.to_string(),
            text,
            ast: ast.clone(),
        };
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(file));
    }

    /// The file defining `name` with `arity` parameters: the caller's own
    /// file first, then the recipe, then the modules in import order.
    pub fn defining(
        &self,
        caller: Option<&str>,
        name: &str,
        arity: usize,
    ) -> Result<Arc<SourceFile>, String> {
        let files = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut order: Vec<&Arc<SourceFile>> = files
            .iter()
            .filter(|f| Some(f.id.as_str()) == caller)
            .collect();
        order.extend(files.iter().filter(|f| Some(f.id.as_str()) != caller));
        let arities = |f: &&Arc<SourceFile>| {
            f.ast
                .iter_functions()
                .filter(|m| m.name == name)
                .map(|m| m.params.len())
                .collect::<Vec<_>>()
        };
        if let Some(f) = order.iter().find(|f| arities(f).contains(&arity)) {
            return Ok(Arc::clone(f));
        }
        Err(match order.iter().flat_map(arities).next() {
            Some(a) => format!(
                "schedule function `{name}` takes {a} parameters; a schedule takes one, the progress `p`"
            ),
            None => {
                format!("no script function `{name}` taking one parameter is defined in the recipe")
            }
        })
    }
}

/// Resolves `import "lib/x" as x;` to `lib/x.rhai` under the importing
/// file's folder, the recipe's folder or the `recipes/` folder, and nowhere
/// else (no absolute paths, no `..`, no symlinks leading out).
pub(crate) struct Imports {
    roots: Vec<PathBuf>,
    sources: Arc<Sources>,
    watched: Watched,
    cache: Mutex<HashMap<PathBuf, SharedModule>>,
    loading: Mutex<Vec<PathBuf>>,
}

impl Imports {
    pub fn new(recipe: &Path, sources: Arc<Sources>, watched: Watched) -> Imports {
        let dir = recipe.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let mut roots = vec![dir.clone()];
        roots.extend(recipes_root(&dir));
        Imports {
            roots,
            sources,
            watched,
            cache: Mutex::default(),
            loading: Mutex::default(),
        }
    }

    fn locate(&self, importer: Option<&str>, path: &str) -> Result<(PathBuf, PathBuf), String> {
        let rel = Path::new(path);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!(
                "import `{path}`: only relative paths inside the recipes folder are allowed"
            ));
        }
        let rel = if rel.extension().is_some_and(|e| e == "rhai") {
            rel.to_path_buf()
        } else {
            rel.with_extension("rhai")
        };
        let allowed: Vec<PathBuf> = self
            .roots
            .iter()
            .filter_map(|r| r.canonicalize().ok())
            .collect();
        let importer_dir = importer.map(|s| {
            Path::new(s)
                .parent()
                .unwrap_or(Path::new("."))
                .to_path_buf()
        });
        for base in importer_dir.iter().chain(&self.roots) {
            let candidate = base.join(&rel);
            let Ok(real) = candidate.canonicalize() else {
                continue;
            };
            if allowed.iter().any(|a| real.starts_with(a)) {
                return Ok((candidate, real));
            }
        }
        let searched: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        Err(format!(
            "import `{path}`: no {} under {}",
            rel.display(),
            searched.join(" or ")
        ))
    }
}

/// The `recipes` folder above `dir` (or `dir` itself): the nearest ancestor
/// named `recipes`, else the nearest ancestor holding a `recipes` folder.
pub(crate) fn recipes_root(dir: &Path) -> Option<PathBuf> {
    let abs = dir.canonicalize().ok()?;
    abs.ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "recipes"))
        .map(Path::to_path_buf)
        .or_else(|| {
            abs.ancestors()
                .map(|a| a.join("recipes"))
                .find(|r| r.is_dir())
        })
}

impl ModuleResolver for Imports {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        // Not `ErrorModuleNotFound`: Rhai replaces that with its own message.
        let (shown, real) = self
            .locate(source, path)
            .map_err(|m| Box::new(EvalAltResult::ErrorRuntime(m.into(), pos)))?;
        if let Some(m) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&real)
        {
            return Ok(m.clone());
        }
        let id = shown.display().to_string();
        let in_module =
            |e: Box<EvalAltResult>| Box::new(EvalAltResult::ErrorInModule(id.clone(), e, pos));
        {
            let mut loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
            if loading.contains(&real) {
                return Err(in_module(format!("import cycle through `{path}`").into()));
            }
            loading.push(real.clone());
        }
        let result = (|| {
            let text: Arc<str> = std::fs::read_to_string(&real)
                .map_err(|e| -> Box<EvalAltResult> { format!("{id}: {e}").into() })?
                .into();
            let mut ast = engine.compile(&*text).map_err(|e| {
                Box::new(EvalAltResult::ErrorParsing(
                    e.err_type().clone(),
                    e.position(),
                ))
            })?;
            ast.set_source(id.as_str());
            self.watched.add(&ast);
            self.sources.add(&id, Arc::clone(&text), &ast);
            Module::eval_ast_as_new(Scope::new(), &ast, engine).map(SharedModule::from)
        })();
        self.loading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| p != &real);
        let module = result.map_err(in_module)?;
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(real, module.clone());
        Ok(module)
    }
}
