# QSpec.cmake: compile .qspec specs as part of a CMake build.
#
#   cmake_minimum_required(VERSION 3.21)
#   project(app NONE)                      # qspec needs no compiler languages
#   include(path/to/integrations/cmake/QSpec.cmake)
#   qspec_compile(NAME tiny_model SRC tiny.qspec OUT_DIR qspec/tiny)
#
# qspec_compile(NAME <target> SRC <spec> OUT_DIR <dir> [DEPENDS <file-or-target>...]
#               [OPTIONS <qspec compile option>...])
#
#   NAME     a custom target, part of ALL, that builds the folder.
#   SRC      the spec; a relative path is relative to CMAKE_CURRENT_SOURCE_DIR.
#   OUT_DIR  the build folder (manifest.json, model.onnx, reports); a relative path is relative
#            to CMAKE_CURRENT_BINARY_DIR. qspec replaces this folder on each build: give it a
#            folder of its own.
#   DEPENDS  more dependencies. Files the build reads need not be listed: `qspec compile
#            --depfile` reports the included specs, model Python files, weights and calibration
#            data it read. List what it cannot see (files read by native code) and generated
#            files: a generated file is made before the compile and rebuilds it when it
#            changes; a bare custom target name only orders the builds.
#   OPTIONS  extra `qspec compile` options, e.g. --fail-under cosine=0.97
#
# The target gets the properties QSPEC_OUT_DIR and QSPEC_MANIFEST (absolute paths).
# The qspec program is the cache variable QSPEC_EXECUTABLE (default: `qspec` on PATH), e.g.
#   cmake -DQSPEC_EXECUTABLE=$PWD/.venv/bin/qspec ...
#
# Needs CMake 3.21 (add_custom_command DEPFILE with every generator: Ninja, Makefiles,
# Visual Studio, Xcode). The depfile is written next to OUT_DIR (OUT_DIR.d), not inside it, and
# all its paths are absolute, so CMP0116 (depfile paths relative to the binary dir) has nothing
# to convert.

if(CMAKE_VERSION VERSION_LESS "3.21")
  message(FATAL_ERROR
    "QSpec.cmake needs CMake 3.21 or newer (add_custom_command DEPFILE); this is CMake "
    "${CMAKE_VERSION}. Install a newer CMake, e.g. `pip install cmake`.")
endif()

include_guard(GLOBAL)

find_program(QSPEC_EXECUTABLE NAMES qspec DOC "The qspec compiler (qspec compile SPEC -o DIR)")

# Policies are recorded when a function is defined: the function sees these whatever the
# including project's cmake_minimum_required says.
cmake_policy(PUSH)
cmake_policy(VERSION 3.21)
cmake_policy(SET CMP0116 NEW)

function(qspec_compile)
  cmake_parse_arguments(PARSE_ARGV 0 QSPEC "" "NAME;SRC;OUT_DIR" "DEPENDS;OPTIONS")
  if(QSPEC_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "qspec_compile: unknown arguments: ${QSPEC_UNPARSED_ARGUMENTS}")
  endif()
  foreach(required IN ITEMS NAME SRC OUT_DIR)
    if(NOT QSPEC_${required})
      message(FATAL_ERROR "qspec_compile: ${required} is required "
        "(qspec_compile(NAME <target> SRC <spec> OUT_DIR <dir> [DEPENDS ...]))")
    endif()
  endforeach()
  if(NOT QSPEC_EXECUTABLE)
    message(FATAL_ERROR "qspec_compile: no qspec program found on PATH; set QSPEC_EXECUTABLE, "
      "e.g. -DQSPEC_EXECUTABLE=/path/to/.venv/bin/qspec")
  endif()

  set(spec "${QSPEC_SRC}")
  cmake_path(ABSOLUTE_PATH spec BASE_DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}" NORMALIZE)
  set(out_dir "${QSPEC_OUT_DIR}")
  cmake_path(ABSOLUTE_PATH out_dir BASE_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}" NORMALIZE)
  # NORMALIZE keeps a trailing slash (qspec/tiny/ -> qspec/tiny/): drop it, or the depfile
  # would be qspec/tiny/.d, inside the folder qspec replaces.
  string(REGEX REPLACE "/+$" "" out_dir "${out_dir}")
  set(manifest "${out_dir}/manifest.json")
  set(depfile "${out_dir}.d")

  # The Makefile generators before CMake 4.0 add each new depfile's list to the dependencies
  # they consolidated from earlier depfiles (CMakeFiles/<target>.dir/compiler_depend.internal)
  # instead of replacing them, so a file the spec stopped reading stays a dependency: deleted,
  # its empty rule makes every later build run qspec again. Removing the consolidated list after
  # each compile makes the next build read only the new depfile.
  set(reset_dependencies "")
  if(CMAKE_GENERATOR MATCHES "Makefiles" AND CMAKE_VERSION VERSION_LESS "4.0")
    set(reset_dependencies COMMAND "${CMAKE_COMMAND}" -E rm -f
      "${CMAKE_CURRENT_BINARY_DIR}/CMakeFiles/${QSPEC_NAME}.dir/compiler_depend.internal")
  endif()

  add_custom_command(
    OUTPUT "${manifest}"
    COMMAND "${QSPEC_EXECUTABLE}" compile "${spec}" -o "${out_dir}" --depfile "${depfile}"
            ${QSPEC_OPTIONS}
    ${reset_dependencies}
    MAIN_DEPENDENCY "${spec}"
    DEPENDS ${QSPEC_DEPENDS}
    DEPFILE "${depfile}"
    WORKING_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}"
    COMMENT "qspec: compiling ${QSPEC_SRC} -> ${out_dir}"
    VERBATIM)
  add_custom_target(${QSPEC_NAME} ALL DEPENDS "${manifest}")
  set_target_properties(${QSPEC_NAME} PROPERTIES
    QSPEC_OUT_DIR "${out_dir}"
    QSPEC_MANIFEST "${manifest}")
endfunction()

cmake_policy(POP)
