// Validates rendered Prometheus Operator resources (ServiceMonitor, PrometheusRule) against
// the operator's CRD schemas, from the npm package @kubernetes-models/prometheus-operator.
// kubernetes-validate has no schema for custom resources; this covers them.
// Usage (from scripts/check-deploy): node <tools>/node/validate-crds.mjs rendered.yaml ...
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { ServiceMonitor, PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
const kinds = { ServiceMonitor, PrometheusRule };
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (!doc || !kinds[doc.kind]) continue;
    new kinds[doc.kind](doc).validate();
    checked++;
    console.log(`${file}: ${doc.kind}/${doc.metadata.name} valid`);
  }
}
if (checked === 0) { console.error("no ServiceMonitor or PrometheusRule found"); process.exit(1); }
