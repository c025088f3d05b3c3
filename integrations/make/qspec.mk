# qspec.mk: compile .qspec specs from GNU Make, rebuilding exactly when an input changed.
#
#   QSPEC_SPECS := int4.qspec models/w8a8.qspec     # the specs to build (not included ones)
#   include path/to/integrations/make/qspec.mk
#   all: $(QSPEC_MANIFESTS)
#
# Each SPEC builds the folder $(QSPEC_BUILD_DIR)/SPEC-without-.qspec, e.g. int4.qspec ->
# build/int4/ and models/w8a8.qspec -> build/models/w8a8/. Make tracks the folder through its
# manifest.json, which every successful build rewrites.
#
# `qspec compile --depfile` lists every file the build read (the spec, the specs it includes,
# the model's Python files, weights, calibration data) with an empty rule for each (like
# gcc -MP), so a file that is no longer used can be deleted without "No rule to make target".
# The depfile is written next to the build folder (build/int4.d), never inside it: qspec
# replaces the whole folder in one rename, which would remove a depfile kept there.
#
# Variables (set them before the include, or on the command line):
#   QSPEC            the qspec program (default: qspec on PATH), e.g. .venv/bin/qspec
#   QSPEC_FLAGS      extra `qspec compile` options, e.g. --fail-under cosine=0.97
#   QSPEC_BUILD_DIR  where build folders go (default: build)
#   QSPEC_SPECS      the specs to build; QSPEC_MANIFESTS and QSPEC_DEPFILES follow from it
#
# Spec paths must be relative, inside the project and free of spaces (Make cannot name targets
# with spaces). Requires GNU Make.

QSPEC ?= qspec
QSPEC_FLAGS ?=
QSPEC_BUILD_DIR ?= build
QSPEC_SPECS ?=

QSPEC_MANIFESTS = $(patsubst %.qspec,$(QSPEC_BUILD_DIR)/%/manifest.json,$(QSPEC_SPECS))
QSPEC_DEPFILES = $(patsubst %.qspec,$(QSPEC_BUILD_DIR)/%.d,$(QSPEC_SPECS))

# build/NAME/manifest.json from NAME.qspec; the depfile adds the other inputs. $(@D) is the
# build folder, spelled as the depfile's target expects (build/NAME/manifest.json).
$(QSPEC_BUILD_DIR)/%/manifest.json: %.qspec
	$(QSPEC) compile $< -o $(@D) --depfile $(@D).d $(QSPEC_FLAGS)

# Missing depfiles (before the first build) are fine: the pattern rule's spec prerequisite
# alone already says "build it". Without QSPEC_SPECS, the depfiles found in the build folder's
# first two levels are read instead. The depfiles' rules do not change the default goal: the
# first target of the including Makefile stays the default, wherever the include is.
qspec_default_goal := $(.DEFAULT_GOAL)
ifneq ($(strip $(QSPEC_SPECS)),)
-include $(QSPEC_DEPFILES)
else
-include $(wildcard $(QSPEC_BUILD_DIR)/*.d $(QSPEC_BUILD_DIR)/*/*.d)
endif
.DEFAULT_GOAL := $(qspec_default_goal)
