"""qspec_compile: a Bazel rule that compiles a .qspec spec into a build folder.

    load("//integrations/bazel:qspec.bzl", "qspec_compile")

    qspec_compile(
        name = "tiny",
        spec = "tiny.qspec",
        srcs = ["common.qspec", "model.py"],   # included specs, the model's Python files
        deps = ["weights.npz"],                # weights, calibration data, filegroups
    )

The output is one directory (a tree artifact), bazel-bin/<package>/<name>/ by default, with
manifest.json, model.onnx and the reports; it is the rule's DefaultInfo.

Bazel decides when to rebuild from the declared inputs, so every file the build reads must be
in `spec`, `srcs` or `deps`: `qspec compile --depfile` lists them (compile once outside Bazel
and read the depfile). In a sandbox an undeclared file is missing and the build fails; without
one (e.g. --spawn_strategy=local) a change to it would be missed. Paths in the spec (include,
model, calibration) are relative to the spec's folder, so keep the files in the same layout
as in the source tree (files of the same package are).

The action passes --no-cache: Bazel caches actions itself, and qspec's own content cache would
be state outside Bazel's view. (Latency and tuning measurements still go to qspec's cache
folder, $QSPEC_CACHE_DIR or ~/.cache/qspec; pass `env = {"QSPEC_CACHE_DIR": ...}` to choose
it.)

The qspec program, either:
  * `qspec`: a label of an executable target (a py_binary, or an sh_binary wrapping a venv's
    qspec), built for the exec platform; or
  * `qspec_path`: a string, the program's path, or a name looked up on the action's PATH
    (default "qspec"; set PATH with --action_env=PATH or use an absolute path such as
    "/opt/venv/bin/qspec"). Used only when `qspec` is not set. Not hermetic: Bazel does not
    see the program change.
"""

def _qspec_compile_impl(ctx):
    out = ctx.actions.declare_directory(ctx.attr.out or ctx.label.name)
    spec = ctx.file.spec

    args = ctx.actions.args()
    args.add("compile")
    args.add(spec)
    args.add("-o", out.path)
    args.add("--no-cache")
    args.add_all(ctx.attr.options)

    inputs = depset(
        [spec] + ctx.files.srcs,
        transitive = [dep[DefaultInfo].files for dep in ctx.attr.deps],
    )

    if ctx.attr.qspec:
        executable = ctx.attr.qspec[DefaultInfo].files_to_run
        use_shell_env = False
    else:
        executable = ctx.attr.qspec_path
        use_shell_env = True  # a bare name is found on the action's PATH

    ctx.actions.run(
        executable = executable,
        arguments = [args],
        inputs = inputs,
        outputs = [out],
        env = ctx.attr.env if not use_shell_env else None,
        use_default_shell_env = use_shell_env,
        mnemonic = "QSpecCompile",
        progress_message = "qspec: compiling %s -> %s" % (spec.short_path, out.short_path),
    )
    return [DefaultInfo(files = depset([out]), runfiles = ctx.runfiles(files = [out]))]

qspec_compile = rule(
    implementation = _qspec_compile_impl,
    doc = "Compiles `spec` with `qspec compile SPEC -o <directory> --no-cache`.",
    attrs = {
        "spec": attr.label(
            mandatory = True,
            allow_single_file = [".qspec"],
            doc = "The spec to compile.",
        ),
        "srcs": attr.label_list(
            allow_files = True,
            doc = "Files the spec reads: included specs, the model's Python files.",
        ),
        "deps": attr.label_list(
            allow_files = True,
            doc = "More inputs: weights, calibration data, filegroups, generated files.",
        ),
        "out": attr.string(
            doc = "The output directory's name in the package (default: the rule's name).",
        ),
        "options": attr.string_list(
            doc = "Extra `qspec compile` options, e.g. [\"--fail-under\", \"cosine=0.97\"].",
        ),
        "env": attr.string_dict(
            doc = "Environment of the action (only with `qspec`; with `qspec_path` the " +
                  "default shell environment is used, set it with --action_env).",
        ),
        "qspec": attr.label(
            executable = True,
            cfg = "exec",
            doc = "The qspec program as an executable target; overrides qspec_path.",
        ),
        "qspec_path": attr.string(
            default = "qspec",
            doc = "The qspec program as a path or a name on PATH, when `qspec` is not set.",
        ),
    },
)
