#!/usr/bin/env cwl-runner
# Two steps in the locally imported busybox image: the first counts the lines of a file
# from one cluster, the second puts that count beside a file from another cluster. The
# inputs are paths inside a fedmount mount (by_id/<collection>/...), which cwltool binds
# read-only into each step's container.
cwlVersion: v1.2
class: Workflow
requirements:
  DockerRequirement:
    dockerImageId: fedmount-test/busybox:1
inputs:
  table: File
  note: File
outputs:
  count:
    type: File
    outputSource: count/out
  report:
    type: File
    outputSource: combine/out
steps:
  count:
    run:
      class: CommandLineTool
      baseCommand: [wc, -l]
      stdin: $(inputs.src.path)
      stdout: count.txt
      inputs:
        src: File
      outputs:
        out:
          type: stdout
    in:
      src: table
    out: [out]
  combine:
    run:
      class: CommandLineTool
      baseCommand: [cat]
      stdout: report.txt
      inputs:
        first:
          type: File
          inputBinding: {position: 1}
        second:
          type: File
          inputBinding: {position: 2}
      outputs:
        out:
          type: stdout
    in:
      first: note
      second: count/out
    out: [out]
