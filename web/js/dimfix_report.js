// Dimension Analyzer: show the markdown report on the node, with ComfyUI's own text preview (Markdown /
// Plain text toggle) where the frontend provides it (window.comfyAPI.textPreviewWidgets, newer frontends).
// Older frontends show nothing extra here: the bundled workflow also routes the report to a Preview Any node.
import { app } from "../../../scripts/app.js";

app.registerExtension({
  name: "zimage-dimfix.AnalyzerReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "DimFixDimensionAnalyzer") return;
    const preview = window.comfyAPI?.textPreviewWidgets;
    if (!preview?.addTextPreviewWidgets || !preview?.updateTextPreviewWidgets) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      created?.apply(this, arguments);
      preview.addTextPreviewWidgets(this);
      const mode = this.widgets?.find((w) => w.name === "preview_mode");
      if (mode) mode.value = true; // render as markdown by default
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      executed?.apply(this, arguments);
      preview.updateTextPreviewWidgets(this, output);
    };
  },
});
