//! The sandbox every recipe runs in: resource limits, no `eval`, and imports
//! that resolve only inside the recipe's own folder and the `recipes/` folder.
//! Rhai's standard packages have no file or network access, so the API's
//! declared paths (data folders, weights) are the only ones a script names.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use rhai::{Engine, EvalAltResult, Module, ModuleResolver, Position, Scope};

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
    pub const STRING_SIZE: usize = 1 << 20;
    pub const ARRAY_SIZE: usize = 100_000;
    pub const MAP_SIZE: usize = 10_000;
    pub const MODULES: usize = 64;
}

/// An engine with the sandbox's limits and strictness, and no module
/// resolver (imports fail) until a caller sets one.
pub(crate) fn engine(operations: u64) -> Engine {
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
    cache: Mutex<HashMap<PathBuf, SharedModule>>,
    loading: Mutex<Vec<PathBuf>>,
}

impl Imports {
    pub fn new(recipe: &Path, sources: Arc<Sources>) -> Imports {
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
