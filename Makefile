# The README's two commands: `make demo` and `make test`. Both build their own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := demo

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Synthetic scroll (plain and masked) converted to OME-Zarr (and the plain one to a sharded zarr 3 store, in
# shards of 128 x 256 x 256 so that the small demo scroll has several), the masked TIFFs decompressed, and the
# sheet, which carries ink, rendered into layer TIFFs from a .ppm and from a tifxyz folder of the same surface; each
# script prints a summary of what it wrote.
demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet .
	$(BIN)/python -m scrollzarr.synthetic $(DEMO)/scroll --shape 256 320 352 --ink "HERCVLANEVM PAPYRVS" \
		--ppm $(DEMO)/sheet.ppm --tifxyz $(DEMO)/sheet
	$(BIN)/python -m scrollzarr.synthetic $(DEMO)/scroll_masked --shape 256 320 352 --masked
	$(BIN)/scroll_to_ome $(DEMO)/scroll $(DEMO)/scroll.zarr --overwrite
	$(BIN)/scroll_to_ome $(DEMO)/scroll_masked $(DEMO)/scroll_masked.zarr --overwrite --obytes 1
	$(BIN)/scroll_to_ome $(DEMO)/scroll $(DEMO)/scroll_v3.zarr --overwrite --preset v3-sharded --shard_shape 128,256,256
	$(BIN)/decompress_tiffs $(DEMO)/scroll_masked $(DEMO)/scroll_masked_plain --overwrite
	$(BIN)/ppm_to_layers $(DEMO)/sheet.ppm $(DEMO)/scroll.zarr $(DEMO)/layers $(DEMO)/sheet_stack.tif --overwrite
	$(BIN)/ppm_to_layers $(DEMO)/sheet $(DEMO)/scroll.zarr $(DEMO)/layers_tifxyz $(DEMO)/sheet_tifxyz_stack.tif \
		--overwrite
	@echo "demo stores: $(DEMO)/scroll.zarr (uint16), $(DEMO)/scroll_masked.zarr (uint8) and $(DEMO)/scroll_v3.zarr"
	@echo "  (zarr 3, OME-NGFF 0.5, sharded, blosc-zstd); to view them: $(BIN)/scroll_serve $(DEMO) (README 'scroll_serve')"
	@echo "demo layers: $(DEMO)/layers/00.tif ... 64.tif and $(DEMO)/sheet_stack.tif, the sheet unrolled: its ink"
	@echo "  reads HERCVLANEVM PAPYRVS; the same from the tifxyz surface $(DEMO)/sheet in $(DEMO)/layers_tifxyz and"
	@echo "  $(DEMO)/sheet_tifxyz_stack.tif"

# mypy: the package and the four scripts (all annotated); not tests/ nor bench/, unannotated scripts whose zarr reads
# (Array | Group, array-like | scalar) and regex matches (Match | None) would each need a narrowing first.
lint: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy scrollzarr scroll_to_ome.py ppm_to_layers.py decompress_tiffs.py scroll_serve.py

# zarr-python 2.x (the reader khartes uses) cannot share an environment with zarr 3: a folder of its own.
ZARR2 := $(VENV)/zarr2
$(ZARR2): $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-deps --target $(ZARR2) "zarr>=2.18,<3" "numcodecs>=0.13,<0.16" \
		asciitree fasteners deprecated wrapt

test: lint $(ZARR2)
	SCROLLZARR_ZARR2_PATH=$(abspath $(ZARR2)) $(BIN)/python -m pytest

# Speed and memory (not part of the tests): scroll_to_ome against `cp -r` of the same TIFFs, written to
# bench/RESULTS.md; ppm_to_layers against reading the chunks it touches, written to bench/RESULTS_ppm_to_layers.md;
# decompress_tiffs against `tiffcp -c none` (needs Debian's libtiff-tools), bench/RESULTS_decompress_tiffs.md;
# one shard written by scrollzarr against zarr's own sharding codec (printed); scroll_serve's chunks a second
# against `python -m http.server`, and through its proxy against a slow upstream, bench/RESULTS_scroll_serve.md.
# BENCH_ARGS="--shape 512 2048 2048 --repeats 5" for a larger scroll_to_ome run.
bench: $(BIN)/python
	$(BIN)/python -m pip install --quiet .
	$(BIN)/python bench/bench_scroll_to_ome.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_ppm_to_layers.py
	$(BIN)/python bench/bench_scroll_serve.py
	$(BIN)/python bench/bench_decompress_tiffs.py
	$(BIN)/python bench/bench_shard_write.py

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
