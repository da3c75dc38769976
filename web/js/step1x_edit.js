// Step1X-Edit frontend extension: shows, live, the working resolution the Image Scale node will
// produce for the image connected to it (same arithmetic as step1x_core.imaging.size_for_level).
import { app } from "../../../scripts/app.js";  // served at /extensions/<pack>/js/

const MULTIPLE = 16;

export function sizeForLevel(width, height, level) {
  const ratio = width / height;
  let w, h;
  if (width > height) {
    w = Math.ceil(Math.sqrt(level * level * ratio));
    h = Math.ceil(w / ratio);
  } else {
    h = Math.ceil(Math.sqrt(level * level / ratio));
    w = Math.ceil(h * ratio);
  }
  w = Math.floor(w / MULTIPLE) * MULTIPLE;
  h = Math.floor(h / MULTIPLE) * MULTIPLE;
  return w < MULTIPLE || h < MULTIPLE ? null : [w, h];
}

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

// The pixel size of the image feeding this node, when a LoadImage-like node upstream has shown it.
function sourceImageSize(node) {
  const source = node.getInputNode?.(0);
  const img = source?.imgs?.[0];
  return img?.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null;
}

function workingSizeLabel(node) {
  const level = widgetValue(node, "size_level") === "custom"
    ? Number(widgetValue(node, "custom_size"))
    : Number(widgetValue(node, "size_level"));
  const source = sourceImageSize(node);
  if (!source) return `working size: about ${level}×${level} (connect a loaded image)`;
  const size = sizeForLevel(source[0], source[1], level);
  if (!size) return `working size: aspect ratio too extreme for ${level}`;
  return `working size: ${size[0]}×${size[1]} (from ${source[0]}×${source[1]})`;
}

app.registerExtension({
  name: "Step1XEdit.WorkingSize",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "Step1XEditImageScale") return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (this.flags?.collapsed) return;
      this.step1xWorkingSize = workingSizeLabel(this);
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.fillStyle = "#8fd18f";
      ctx.textAlign = "left";
      ctx.fillText(this.step1xWorkingSize, 10, this.size[1] - 8);
      ctx.restore();
    };
    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize ? computeSize.apply(this, arguments) : [this.size[0], this.size[1]];
      return [size[0], size[1] + 18]; // room for the label
    };
  },
});
