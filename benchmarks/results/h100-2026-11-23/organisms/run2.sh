export PYTHONUNBUFFERED=1
timeout 520 python3 -m attnlab train --out /tmp/small --preset small --config small-gpu.json 2>&1 | grep -v -E "Loading weights|Writing model" > /tmp/train.log
cp /tmp/train.log $OUT/train.log; cp /tmp/small/final/model.safetensors $OUT/; tar cf $OUT/final-rest.tar -C /tmp/small/final --exclude model.safetensors .
mkdir -p /tmp/ev; end=575
for m in streaming sliding_window block_topk vertical_slash dilated block_local; do
  left=$((end - SECONDS)); [ $left -lt 10 ] && break
  timeout $left python3 -m attnlab eval --model /tmp/small/final --methods $m --tasks passkey,niah_multikey --lengths 8192 --samples 10 --device cuda --out /tmp/ev/$m.json > /tmp/ev/$m.log 2>&1; echo "$m rc=$?"
done
tar czf $OUT/eval.tgz -C /tmp ev; ls -la $OUT
