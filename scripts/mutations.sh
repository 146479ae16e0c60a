#!/usr/bin/env bash
# Tests that can fail: break the code once per test (one plausible bug each), run the test that
# should catch it, and restore the file. Every line must say "caught". Run from anywhere:
#   bash scripts/mutations.sh          (about 2 minutes on 2 cores; needs the embedded model)
# Output recorded in docs/TESTING.md. The working tree must be clean of edits to these files.
cd "$(dirname "$0")/.."
backup=$(mktemp)
out=$(mktemp)
trap 'rm -f "$backup" "$out"' EXIT
check() {  # file, text to replace, replacement, pytest selector
  local file="$1" old="$2" new="$3" sel="$4"
  cp "$file" "$backup"
  python3 - "$file" "$old" "$new" <<'PY'
import sys
p, old, new = sys.argv[1:4]
s = open(p).read()
assert old in s, f"mutation anchor not found in {p}: {old!r}"
open(p, "w").write(s.replace(old, new, 1))
PY
  if timeout 600 python3 -m pytest -q -x -p no:cacheprovider $sel >"$out" 2>&1; then
    echo "NOT CAUGHT: $file :: $old -> $new :: $sel"
  else
    echo "caught    : $file by $sel ($(grep -Eo '[0-9]+ failed' "$out"))"
  fi
  cp "$backup" "$file"
}
check structkv/pivot.py "            if self.rule == \"argmax\":
                return layer" "            if self.rule == \"argmax\":
                return layer + 1" "tests/test_pivot.py::test_online_rule_on_recorded_model_series"
check structkv/pivot.py "return max(1, int(0.2 * num_layers))" "return int(0.2 * num_layers)" "tests/test_pivot.py::test_search_range_default"
check structkv/eval/reports.py "        t = transition_scores(metrics)" "        t = transition_scores(metrics, scales=(1.0, 1.0, 1.0))" "tests/test_reports.py::test_pivot_report"
check structkv/eval/reports.py "    mean = {k: [statistics.mean(col) for col in zip(*v)] for k, v in curves.items()}" "    mean = {k: [statistics.median(col) for col in zip(*v)] for k, v in curves.items()}" "tests/test_reports.py::test_pivot_report"
check structkv/eval/reports.py "    return {\"propagated\": len(needle & propagated) / len(needle), \"kv_per_layer\": per_layer}" "    return {\"propagated\": None, \"kv_per_layer\": per_layer}" "tests/test_reports.py::test_decoupling_report"
check structkv/models.py "    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)" "    config.attention_bias = True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)" "tests/test_models.py::test_tiny_families_load_with_their_layouts"
check structkv/methods/structkv.py "            rule=profile.get(\"rule\") or self.rule," "            rule=self.rule," "tests/test_calibration.py::test_rule_profile_drives_the_online_pivot"
check structkv/methods/structkv.py "            pivot=profile[\"pivot\"]," "            pivot=\"online\"," "tests/test_calibration.py::test_fixed_pivot_profile_drives_the_prefill"
check structkv/eval/runner.py "                missing = [m for m in cfg.methods if _key(m, t, n, cfg.seed + i) not in results]" "                missing = list(cfg.methods)" "tests/test_runner.py::test_quick_profile_on_the_embedded_model"
check structkv/saliency.py "    m = n - window" "    m = n" "tests/test_formulas.py"
check structkv/methods/streamingllm.py "idx = torch.cat([torch.arange(sinks, device=device), recent])" "idx = torch.cat([torch.arange(sinks), recent])" "tests/test_methods.py -k device"
check structkv/cache.py "        if t + n > self.k.shape[2]:" "        if False:" "tests/test_methods.py -k in_place"
check structkv/methods/structkv.py "        if self.r_kv > self.r_struct:" "        if False:" "tests/test_export.py::test_export_cli_refusals_leave_nothing"
check runtime/triton_model.py "                        self.scheduler.cancel(flight.rid)" "                        pass" "tests/test_triton.py -k grpc"
check runtime/triton_model.py "                    flight.sender.send(self._response({\"text_output\": event.text}))" "                    flight.parts.append(event.text)" "tests/test_triton.py -k generate_stream"
check runtime/triton_model.py "            text = flight.parsed.prompt + \"\".join(flight.parts)" "            text = \"\".join(flight.parts)" "tests/test_triton.py -k structkv_run"
check structkv/kernels/select_triton.py "((tie != 0) & (tie_rank < ties_wanted))" "((tie != 0) & (tie_rank <= ties_wanted))" "tests/test_kernels_triton.py"
check structkv/kernels/select_triton.py "            acc += tl.load(base + j, mask=inside & (j >= 0) & (j < m), other=0.0)" "            acc += tl.load(base + j, mask=inside & (j >= 0) & (j < n), other=0.0)" "tests/test_kernels_triton.py"
check plugins_trt/structKVCompactPlugin/structKVCompactPlugin.cpp "DimensionOperation::kCEIL_DIV" "DimensionOperation::kFLOOR_DIV" "tests/test_plugins_build.py"
check plugins_trt/structKVCompactPlugin/structKVSelection.h "    return (r.num * n + r.den - 1) / r.den;" "    return (r.num * n) / r.den;" "tests/test_plugins_build.py"
check export/tensorrt.py "        \"ratio_den\": ratio.denominator," "        \"ratio_den\": ratio.denominator + 1," "tests/test_export_tensorrt.py -k reference_op"
check plugins_trt/structKVCompactPlugin/structKVCompactPlugin.cpp "        at += cells * sizeof(int64_t); // K <= n" "        at += cells * sizeof(int32_t);" "tests/test_plugins_build.py -k selftest"
check structkv/calibration.py "run.caches[(method.chunk, method.r_kv)]" "run.caches[(method.chunk, 0.1)]" "tests/test_calibration.py -k direct_runs"
check structkv/methods/structkv.py "            evidence += share(state.deep)" "            evidence += 0 * share(state.deep)" "tests/test_kv_evidence.py"
check structkv/calibration.py "runs, at[\"pivot\"], at[\"r_struct\"], at[\"r_kv\"], w, pl, c, _schedule(at)" "runs, pivot, at[\"r_struct\"], at[\"r_kv\"], w, pl, c, _schedule(at)" "tests/test_calibration.py -k first_pass_choice"
check structkv/calibration.py "    budget_rows = first if (w, pl, c) == (w0, pl0, c0) else budget_pass(w, pl, c)" "    budget_rows = first" "tests/test_calibration.py -k rows_equal"
check structkv/graphs.py "        return select_tokens(scores, k, self.window, self.pooling, self.pool_mode, self.chunk)" "        return select_tokens(scores, k, self.window, self.pooling, self.pool_mode)" "tests/test_export.py -k chunked"
check structkv/selection.py "    keep = torch.sym_min(whole, torch.sym_max(1, torch.sym_max(k - rest, 0) // chunk))" "    keep = torch.sym_min(whole, torch.sym_max(1, (k - rest) // chunk))" "tests/test_export.py -k chunked"
check structkv/selection.py "    return min(whole, max(1, max(k - rest, 0) // chunk)) * chunk + rest + window" "    return min(whole, max(1, max(k - rest, 0) // chunk)) * chunk + window" "tests/test_chunk_selection.py -k selected_count"
check structkv/eval/frontier.py "                    best = min(ok, key=lambda r: (r[\"compute_fraction\"] or 1.0, r[\"r_kv\"])," "                    best = min(ok, key=lambda r: (r[\"r_kv\"], r[\"compute_fraction\"] or 1.0))," "tests/test_frontier.py -k cheapest"
check structkv/kernels/select_triton.py "            total += bits.to(tl.float32, bitcast=True).to(tl.float64)" "            total = (total.to(tl.float32) + bits.to(tl.float32, bitcast=True)).to(tl.float64)" "tests/test_kernels_triton.py -k chunk"
check plugins_trt/structKVCompactPlugin/structKVCompactPlugin.cpp "op(DimensionOperation::kMAX, exprBuilder.constant(1), op(DimensionOperation::kFLOOR_DIV, over, c))" "op(DimensionOperation::kFLOOR_DIV, over, c)" "tests/test_plugins_build.py -k chunk"
check export/tensorrt.py "        \"chunk\": method.chunk if method.chunk > 1 else 0," "        \"chunk\": 0," "tests/test_export_tensorrt.py -k chunk"
check structkv/eval/reports.py "        method = as_method(name, lm.model_id, **own)" "        method = as_method(name, lm.model_id)" "tests/test_reports.py -k knobs"
check runtime/stages.py "        if cpu and not exact_u8s8_products():" "        if False:" "tests/test_quant.py -k runtime_opens"
check runtime/stages.py "                helper.make_tensor(f\"{tag}_zp\", TensorProto.UINT8, [], [128])," "                helper.make_tensor(f\"{tag}_zp\", TensorProto.UINT8, [], [127])," "tests/test_quant.py -k w8a8"
check structkv/kernels/csrc/causal_attention.cc "      sum += row[j];" "      (void)0;" "tests/test_ort_ops.py -k matches_sdpa"
check structkv/calibration.py "        method = StructKV(r_struct=rs, r_kv=rk, window=w, pooling=pl, chunk=c, pivot=0)" "        method = StructKV(r_struct=rs, r_kv=rk, window=w, pooling=7, chunk=c, pivot=0)" "tests/test_calibration.py -k first_pass_choice"
check structkv/calibration.py "        runs = [_record(model, x, variants[0][1], window, pooling, steps, variants) for x in ids]" "        runs = [_record(model, x, variants[0][1], window, 7, steps, variants) for x in ids]" "tests/test_calibration.py -k first_pass_choice"
check structkv/calibration.py "    answer = matched_prefix(predicted, run.full_tokens, run.skip)" "    answer = matched_prefix(predicted, run.full_tokens)" "tests/test_calibration.py -k question"
check structkv/calibration.py "        run.skip = echo_length(lm.tokenizer, prompt, run.full_tokens)" "        pass" "tests/test_calibration.py -k question"
check structkv/calibration.py "            run.skip = echo_length(lm.tokenizer, text, run.full_tokens)" "            pass" "tests/test_calibration.py -k question"
check structkv/generate.py "            visible &= diff < window" "            pass" "tests/test_methods.py -k forced_logits"
check structkv/generate.py "        visible = diff >= 0" "        visible = diff >= -1000" "tests/test_methods.py -k forced_logits"
check structkv/calibration.py "    answer = matched_prefix(predicted, run.full_tokens, run.skip)" "    answer = sum(agree[run.skip :]) / max(1, len(agree) - run.skip)" "tests/test_calibration.py"
check structkv/calibration.py "        drawn = calibration_prompts(tokenizer, DRAWS[part] * kept, length, seed + offset, part)" "        drawn = calibration_prompts(tokenizer, DRAWS[part] * kept, length, seed, part)" "tests/test_calibration.py -k mixed"
check structkv/calibration.py "        out.selected += [out.drawn + i for i, _, _ in chosen]" "        out.selected += [i for i, _, _ in chosen]" "tests/test_calibration.py -k mixed"
check structkv/cli.py "        budget_grid=grid," "        budget_grid=None," "tests/test_cli.py -k r_kvs"
check structkv/calibration.py "    return max(rows, key=lambda r: (r[objective], -r[\"kl\"]))" "    return max(rows, key=lambda r: r[objective] - r[\"kl\"])" "tests/test_calibration.py -k choose_window"
check structkv/calibration.py "    for part, prompts, kept in drawn_prompts(lm.tokenizer, n, length, prompt_set, seed):" "    for part, prompts, kept in drawn_prompts(lm.tokenizer, n, length, prompt_set):" "tests/test_calibration.py -k held_out"
check structkv/methods/fastkv.py "        if not 0 <= layer < num_layers - 1:" "        if not 0 <= layer < num_layers:" "tests/test_reliability_inputs.py -k tsp"
check structkv/methods/gemfilter.py "        if not 0 <= layer < num_layers:" "        if not layer < num_layers:" "tests/test_reliability_inputs.py -k filter"
check structkv/paths.py "        os.chmod(tmp, 0o666 & ~umask)" "        pass" "tests/test_atomic_json.py"
check structkv/paths.py "        Path(tmp).unlink(missing_ok=True)" "        pass" "tests/test_atomic_json.py"
check structkv/eval/compare.py "    k = min(wins_a, wins_b)" "    k = max(wins_a, wins_b)" "tests/test_eval_compare.py"
check structkv/eval/compare.py "        if \"score\" not in entry or not other or \"score\" not in other:" "        if \"score\" not in entry:" "tests/test_eval_compare.py"
check structkv/eval/compare.py "            total += sum(c.a[i] - c.b[i] for i in picks) / n" "            total += sum(c.a[i] - c.b[rng.randrange(n)] for i in picks) / n" "tests/test_eval_compare.py"
check structkv/eval/compare.py "    return 100 * sum(sum(getattr(c, side)) / len(getattr(c, side)) for c in cells) / len(cells)" "    return 100 * sum(sum(getattr(c, side)) for c in cells) / sum(len(c.a) for c in cells)" "tests/test_eval_compare.py"
check structkv/eval/compare.py "    matches = [label for label in labels if label.split(\" \", 1)[0] == name]" "    matches = [label for label in labels if label.startswith(name)]" "tests/test_eval_compare.py"
check structkv/models.py "TORCH_DTYPES = {\"fp32\": torch.float32, \"bf16\": torch.bfloat16, \"fp16\": torch.float16}" "TORCH_DTYPES = {\"fp32\": torch.float32, \"bf16\": torch.float16, \"fp16\": torch.float16}" "tests/test_cli.py -k bf16"
check structkv/methods/gemfilter.py "        if view.layer == state.layer and self.filter_score == \"window\":" "        if view.layer == state.layer and False:" "tests/test_formulas.py -k window_score"
check export/exporter.py "SKIPPED_REWRITES = frozenset({\"SlicesSplit\"})" "SKIPPED_REWRITES = frozenset({\"SlicesSplit\", \"SqueezeReshape1d\"})" "tests/test_export.py -k skipped_rewrites"
check export/exporter.py "        if pid.isdigit() and not _alive(int(pid)):" "        if False:" "tests/test_reliability_export.py -k sigkill_at_any_point"
check export/exporter.py "    if out.exists() and not out.is_dir():
        raise StructKVError(f\"--out {out} exists and is not a directory" "    if force and out.is_dir():
        shutil.rmtree(out)
    if out.exists() and not out.is_dir():
        raise StructKVError(f\"--out {out} exists and is not a directory" "tests/test_reliability_export.py -k killed_force"
check structkv/calibration.py "    if not search[\"met\"]:" "    if False:" "tests/test_calibration.py -k not_met"
check structkv/calibration.py "            f\"{search['chosen_row'].get(objective, nan):.3f}); below its target the search's \"" "            f\"{search['target_fidelity']:.3f}); below its target the search's \"" "tests/test_calibration.py -k not_met"
check structkv/calibration.py "            return bool(got) and re.sub(r\"\\W\", \"\", got[0]) == self.continuation" "            return bool(got) and self.continuation in answer" "tests/test_calibration.py -k fact_probes"
check structkv/calibration.py "    at = rng.randrange(1, len(context)) if len(context) > 1 else 1" "    at = 0" "tests/test_calibration.py -k fact_probes"
check structkv/calibration.py "                *deepest_pivots(num_layers, grid_r_structs, compute_cap, l_min, l_max)," "" "tests/test_calibration.py -k budget_search_tables"
check structkv/calibration.py "        if fits:
            out.append(max(fits))" "        if fits:
            out.append(min(fits))" "tests/test_calibration.py -k budget_search_tables"
check structkv/eval/compare.py "        if b_results is not None and entry.get(\"answers\") != other.get(\"answers\"):" "        if False:" "tests/test_eval_compare.py -k another_run"
check structkv/eval/compare.py "    other_run = results if b_results is None else b_results" "    other_run = results" "tests/test_eval_compare.py -k another_run"
check structkv/calibration.py "answer to {settings.get('prompt_set', 'copy')} probes" "answer to copy probes" "tests/test_calibration.py -k mixed_probes"
check runtime/engine.py "            for position, token in enumerate(ids.tolist()):" "            for position, token in list(enumerate(ids.tolist()))[-1:]:" "tests/test_export.py -k short_prompts"
check runtime/engine.py "            self.cache.release(_SCRATCH)" "            pass" "tests/test_export.py -k short_prompts"
check runtime/backends.py "        return self.method if n > self.method.window else Full()" "        return self.method" "tests/test_serve.py -k torch_backend"
check runtime/triton_model.py "        return default if value is None else value" "        return value" "tests/test_triton.py -k final_outputs"
check structkv/calibration.py 'DEFAULT_PROMPT_SET = "fact"' 'DEFAULT_PROMPT_SET = "copy"' "tests/test_cli.py -k calibrate_r_kvs"
check structkv/calibration.py "    return min(DEFAULT_LENGTH, int(context))" "    return 2048" "tests/test_cli.py -k calibration_length"
check structkv/cli.py "    length = args.length or calibration_length(lm.model.config)" "    length = args.length or 2048" "tests/test_cli.py -k calibrate_r_kvs"
check structkv/methods/structkv.py "            value[view.positions] += view.saliency" "            value[view.positions] += 0 * view.saliency" "tests/test_refine.py -k continued"
check structkv/prefill.py "    tokens_run = (compacted.layer + 1) * n_prompt + tokens_after" "    tokens_run = (compacted.layer + 1) * n_prompt + (len(ctx.layers) - compacted.layer - 1) * stats.propagated_tokens" "tests/test_refine.py -k compute"
check structkv/prefill.py "            h, positions = compact(h, positions, chosen)" "            pass" "tests/test_refine.py -k continued"
check structkv/calibration.py "            folding.observe_compacted(view, tracked)" "            pass" "tests/test_calibration.py -k two_stage_rows"
check structkv/calibration.py "    return (pivot + 1 + (refine_layer - pivot) * r_struct + after * r_refine) / num_layers" "    return (pivot + 1 + (refine_layer - pivot - 1) * r_struct + after * r_refine) / num_layers" "tests/test_calibration.py -k refine_search"
check structkv/methods/structkv.py "            chosen.update(refine_layer=budgets[\"refine_layer\"], r_refine=budgets[\"r_refine\"])" "            pass" "tests/test_calibration.py -k two_stage_profile"
check structkv/graphs.py "            centrality = accumulate(centrality, heads.sum(0), lam)" "            pass" "tests/test_export_refine.py -k matches_the_torch_method"
check structkv/graphs.py "        return compact(hidden, positions, self.keep(centrality, prompt_len.shape[0]))" "        return compact(hidden, positions, self.keep(centrality, hidden.shape[1]))" "tests/test_export_refine.py -k matches_the_torch_method"
check export/tensorrt.py "    \"refine\": (\"kv_select\", \"r_refine\")," "    \"refine\": (\"kv_select\", \"r_kv\")," "tests/test_export_refine.py -k tensorrt_target"
check runtime/engine.py "            if self.compresses(int(positions_c.shape[0])):" "            if False:" "tests/test_export_refine.py -k two_stage_engine_matches"
