"""A synthetic V-Interaction-400K / V-Perception-40K pair of parquet files, shaped as the Hub's cards describe
them (id, question, image {bytes, path}, original_img_code, edited_image, tool_code, CoT_with_code, answer;
V-Perception: id, image, question, answer, python_code, element_arrtibute), with code in the layout of
V-Thinker's prompt (data/prompt.txt:10-15): <code>, a ```python fence, </code>, then <sandbox_output>.

    python tests/vinteraction_synth.py DIR     # writes DIR/v_interaction.parquet and DIR/v_perception.parquet

The code in it is never run by the converter. Some of it would write files under `sentinels` if it were:
the tests check that those files never appear.
"""
import io
import sys
from pathlib import Path

from PIL import Image


def png(color, size=(56, 56), kind="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, kind)
    return buf.getvalue()


def block(code, output="<image>"):
    """A code block as V-Thinker writes one, with the sandbox's reply after it."""
    return f"<code>\n```python\n{code.strip()}\n```\n</code>\n<sandbox_output>{output}</sandbox_output>\n"


PIL_CODE = """
from PIL import Image, ImageDraw, ImageFont
img = Image.open(image_path)
draw = ImageDraw.Draw(img)
draw.line([(10, 40), (50, 40)], fill="red", width=2)
draw.text((12, 30), "h", fill="blue", font=ImageFont.load_default())
processed_path = "/tmp/out.png"
print(processed_path)
"""
CV2_CODE = """
import cv2
img = cv2.imread(image_path)
cv2.rectangle(img, (5, 5), (30, 30), (0, 255, 0), 2)
for p, q in zip(starts, ends):
    cv2.arrowedLine(img, p, q, (255, 0, 0), 1)
cv2.putText(img, str(round(max(len(starts), 3))), (8, 50), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
"""
MPL_CODE = """
import matplotlib.pyplot as plt
import matplotlib.patches as patches
fig, ax = plt.subplots()
ax.imshow(plt.imread(image_path))
ax.plot([0, 20], [0, 20], "r-")
ax.axhline(y=10)
ax.add_patch(patches.Circle((20, 20), radius=5, fill=False))
ax.annotate("B", xy=(20, 20), xytext=(40, 40), arrowprops=dict(arrowstyle="->"))
ax.annotate("A", xy=(5, 5))
pattern = re.compile("\\d+")
"""
ZOOM_CODE = """
import cv2
from PIL import Image
img = Image.open(image_path)
big = img.crop((10, 10, 30, 30)).resize((80, 80))
arr = cv2.imread(image_path)
roi = arr[10:30, 5:25]
roi = cv2.resize(roi, None, fx=4, fy=4)
rgb = arr[:, :, ::-1]
"""
NO_DRAWING_CODE = """
import math
print(math.sqrt(3 ** 2 + 4 ** 2))
"""


def interaction_rows(sentinels):
    """[(row, what the converter should do with it)]."""
    s = Path(sentinels)
    dangerous = f"""
import os
from PIL import Image, ImageDraw
open({str(s / 'PWNED_open')!r}, 'w').write('ran')
os.system('touch {s / 'PWNED_system'}')
Image.new('RGB', (4, 4)).save({str(s / 'PWNED_save.png')!r})
__import__('subprocess').run(['touch', {str(s / 'PWNED_subprocess')!r}])
ImageDraw.Draw(Image.open(image_path)).line([(0, 0), (9, 9)])
"""

    def row(i, cot, answer, image=None, question="How long is segment AB?"):
        return {"id": f"vi-{i}", "question": question, "image": {"bytes": image or png((10 * i, 80, 160)),
                                                                  "path": f"{i}.png"},
                "original_img_code": "print('the figure')", "edited_image": None, "tool_code": "",
                "CoT_with_code": cot, "answer": answer}

    return [
        (row(0, f"<think>AB looks horizontal. Mark its height.\n{block(PIL_CODE)}The line shows AB = 4.</think>\n"
                "<answer>4</answer>", "4", question="<image>\nHow long is segment AB?"), "kept"),
        (row(1, f"<think>Box the cars, then count.{block(CV2_CODE)}There are 3 cars.</think> <answer>3</answer>",
             "3", image=png((200, 30, 30), kind="JPEG")), "kept"),
        (row(2, f"<think>Plot the diagonal.\n{block(MPL_CODE)}\nB lies on it.</think>\n<answer>B</answer>", "B"),
         "kept"),
        (row(3, f"<think>The label is tiny.\n{block(ZOOM_CODE)}\nIt reads 7.</think>\n<answer>7</answer>",
             "\\boxed{7}"), "kept"),
        (row(4, "<think>First the line.\n" + block("draw.line([(0, 0), (5, 5)])") + "Then the label.\n"
                + block("draw.text((1, 1), 'x')") + "So x = 2.</think>\n<answer>2</answer>", "2"), "kept"),
        (row(5, "<think>The bag is white.</think>\n<answer>white</answer>", "white"), "no code block"),
        (row(6, "<think>Draw.\n" + block("draw.line([(0, 0), (5, 5)]") + "Done.</think><answer>1</answer>", "1"),
         "unparsable code"),
        (row(7, f"<think>Compute.\n{block(NO_DRAWING_CODE, '5.0')}So 5.</think>\n<answer>5</answer>", "5"),
         "code with no drawing operation"),
        (row(8, f"<think>Mark it.\n{block(dangerous)}Marked.</think>\n<answer>9</answer>", "9"), "kept"),
        (row(9, "<think>Draw.\n" + block("draw.line([(0, 0), (5, 5)])", "Sandbox for vi-9: Code execution "
                "failed due to ImportError.") + "Hmm.</think><answer>1</answer>", "1"),
         "code failed in the sandbox"),
        (row(10, "<think>Draw.\n" + block("draw.line([(0, 0), (5, 5)])") + "So 6.</think><answer>6</answer>",
             "8"), "answer differs from the answer field"),
    ]


def perception_rows():
    return [{"id": f"vp-{i}", "image": {"bytes": png((30, 30 * i, 90)), "path": None},
             "question": f"How many points are marked in the figure? ({i})", "answer": str(i + 2),
             "python_code": "plt.scatter([1], [2])", "element_arrtibute": ["point"]} for i in range(3)]


def write(folder, row_group_size=4):
    """DIR/v_interaction.parquet (several row groups) and DIR/v_perception.parquet; returns both paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vi, vp = folder / "v_interaction.parquet", folder / "v_perception.parquet"
    pq.write_table(pa.Table.from_pylist([r for r, _ in interaction_rows(folder)]), vi, row_group_size=row_group_size)
    pq.write_table(pa.Table.from_pylist(perception_rows()), vp)
    return vi, vp


if __name__ == "__main__":
    print(*write(sys.argv[1]), sep="\n")
