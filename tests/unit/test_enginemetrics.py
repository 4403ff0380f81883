from prometheus_client.parser import text_string_to_metric_families

from server.enginemetrics import merge, relabel

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 1.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 3.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 3.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 1.5
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 10.0
vllm:plain 4
"""


def test_relabel_adds_labels_and_keeps_only_vllm_samples():
    seen: set[str] = set()
    lines = relabel(VLLM, {"model": "m", "replica": "0"}, seen)
    assert 'vllm:num_requests_running{model="m",replica="0",engine="0",model_name="m"} 1.0' in lines
    assert 'vllm:plain{model="m",replica="0"} 4' in lines
    assert not any("python_gc" in line for line in lines)
    again = relabel(VLLM, {"model": "m", "replica": "1"}, seen)
    assert not any(line.startswith("#") for line in again)  # metadata only once


def test_merge_is_valid_exposition_with_one_family_each():
    text = merge([({"model": "a", "replica": "0"}, VLLM), ({"model": "b", "replica": "0"}, VLLM)])
    families = {f.name: f for f in text_string_to_metric_families(text)}
    running = families["vllm:num_requests_running"]
    assert {s.labels["model"] for s in running.samples} == {"a", "b"}
    hist = families["vllm:e2e_request_latency_seconds"]
    assert hist.type == "histogram" and len(hist.samples) == 8
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1
    assert merge([({"model": 'we"ird'}, "vllm:x 1\n")]) == 'vllm:x{model="we\\"ird"} 1\n'
